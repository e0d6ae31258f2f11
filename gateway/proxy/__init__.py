"""Forwarding to upstreams: pure header/URL rules (``headers``), streaming I/O (``forward``)."""
