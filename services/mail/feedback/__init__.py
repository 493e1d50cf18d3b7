"""Delivery feedback of the mail service: events, suppressions and webhooks."""
