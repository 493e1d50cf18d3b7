"""Tests of the SMTP submission server."""
