"""Shared test helpers: real loopback servers (DNS) and their pytest fixtures."""
