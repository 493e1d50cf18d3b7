"""Unit tests: pure functions and classes, no database, network or gRPC server."""
