"""Delivery feedback of the mail service: what happened to mail, told back to the tenant."""
