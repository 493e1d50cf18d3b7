"""Domain service: registration, DNS records, ownership verification and lifecycle of domains."""
