"""Helpers shared by the proxy tests (a module of its own: conftest is not importable)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Route
from gateway.errors import GatewayError
from gateway.proxy.forward import Forwarder, ForwardResult

TOKEN = "tok-123"
STRIP = frozenset({"x-saml-assertion"})


def make_route(upstream: str, **settings: Any) -> Route:
    return Route(upstream=upstream, identity_provider="idp", authorization_server="as", **settings)


@dataclass
class Gateway:
    url: str
    forwarder: Forwarder
    results: list[ForwardResult] = field(default_factory=list)
    errors: list[GatewayError] = field(default_factory=list)


StartGateway = Callable[..., Awaitable[Gateway]]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
