"""Identity and access: API keys of tenants (served by the domain service's process)."""
