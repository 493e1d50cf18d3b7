"""Integration tests that run against real local servers."""
