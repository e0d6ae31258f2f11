"""Forwarding to upstreams: pure header/URL rules (``headers``), HTTP streaming (``forward``),
WebSocket relaying (``websocket``), TLS contexts (``tls``), route plans (``upstream``)."""
