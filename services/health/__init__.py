"""Suite health: the REST health routes, aggregated from grpc.health.v1 and the database."""
