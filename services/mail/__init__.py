"""Mail service: durable queue, DKIM-signed delivery, retries, scheduling and tracking."""
