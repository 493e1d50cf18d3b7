"""Azora Email Hosting test suite."""
