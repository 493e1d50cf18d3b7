"""Azora Email Hosting services: shared runtime (`core`) and the domain, SMTP and mail services."""
