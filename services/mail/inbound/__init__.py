"""Inbound mail kept by the mail service: messages the inbound SMTP server received."""
