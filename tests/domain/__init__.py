"""Tests of the domain service: domains, DNS records, ownership verification."""
