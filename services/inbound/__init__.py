"""The inbound SMTP server (MX of hosted domains): a front door to the domain and mail services."""
