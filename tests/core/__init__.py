"""Tests of the shared runtime in services/core/: settings, cache, server runtime, embedded DB."""
