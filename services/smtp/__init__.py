"""SMTP service: per-domain relay configuration, connection tests, DKIM, SPF and DMARC."""
