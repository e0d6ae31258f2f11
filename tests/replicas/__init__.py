"""Several gateway processes sharing one real redis-server (issue 5)."""
