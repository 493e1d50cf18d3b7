"""Benchmarks, soak and fault drills (not tests: they print figures and verdicts)."""
