"""SMTP service tests: relays, connection tests, DKIM, SPF, DMARC, DNS checks."""
