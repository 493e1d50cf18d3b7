"""Tests of the mail service."""
