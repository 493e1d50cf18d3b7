"""SMTP submission server: applications send with SMTP AUTH and an API key (see app.py)."""
