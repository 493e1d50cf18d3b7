"""Tests of the benchmark harness's pure pieces (no Postfix, no suite)."""
