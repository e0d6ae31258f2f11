"""What the server knows about one request: its ID, its access-log record, its JSON error.

The request paths (``gateway.pipeline``, ``gateway.authorizer``) fill an ``AccessRecord`` as
they go; the server (``gateway.app``) makes it, answers failures with ``error_response`` and
writes the access line at the end. The record never holds the assertion or the token.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from gateway.errors import GatewayError, InvalidAssertion
from gateway.logs import access
from gateway.saml.evidence import printable

DEFAULT_REALM = "saml-gateway"

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Generated request IDs: a random per-process prefix and a counter (32 hex characters),
# unique across processes and far cheaper than a uuid4 per request.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count()
_NONE: dict[str, str] = {}  # no extra headers; no trace_id (tracing off) in the access line


def request_id(inbound: str | None) -> str:
    """Keep the client's X-Request-ID when it is short and plain; otherwise make one."""
    if inbound and _SANE_REQUEST_ID.fullmatch(inbound):
        return inbound
    return f"{_ID_PREFIX}{next(_id_counter):016x}"  # 2**64 requests: not in this process


@dataclass(slots=True)
class AccessRecord:
    """What the access log says about one request (never the assertion or the token)."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    route: str = "-"
    cache: str = "-"
    assertion_id: str | None = None
    issuer: str | None = None
    # A refused assertion's ID and Issuer as read before verification: evidence, not identity.
    assertion_id_unverified: str | None = None
    issuer_unverified: str | None = None
    upstream_seconds: float | None = None
    reason: str | None = None
    detail: str | None = None  # the refusal in explain's words ("audience: expected X, ...")
    realm: str = DEFAULT_REALM  # for the 401 challenge: the route's, once it is known
    # With tracing on (gateway.tracing): the request's span, its context token, its trace.
    span: Any = None
    span_token: Any = None
    trace_id: str | None = None


def note_failure(record: AccessRecord, error: GatewayError, refusals: Counter) -> None:
    """What the access line says about a failed request: the reason word (also the label of
    ``refusals``, the metric of refused assertions) and, for the client's mistakes, the
    detail an operator acts on. Server-side failures keep their detail to their own lines."""
    record.reason = error.reason
    if error.status < 500 and error.detail:
        record.detail = error.detail
    if isinstance(error, InvalidAssertion):
        refusals.labels(error.reason).inc()
        if record.assertion_id is None and error.unverified_id is not None:
            record.assertion_id_unverified = printable(error.unverified_id)
        if record.issuer is None and error.unverified_issuer is not None:
            record.issuer_unverified = printable(error.unverified_issuer)


def json_error(
    status: int, error: str, description: str, rid: str, headers: Mapping[str, str] = _NONE
) -> web.Response:
    """The one shape of every error the gateway answers: OAuth's ``error`` and
    ``error_description``, and the request ID, also as ``X-Request-ID``."""
    body = {"error": error, "error_description": description, "request_id": rid}
    return web.json_response(body, status=status, headers={**headers, "X-Request-ID": rid})


def error_response(error: GatewayError, record: AccessRecord) -> web.Response:
    """A gateway error as the client sees it: its status and public message only."""
    headers = error.headers
    if isinstance(error, InvalidAssertion):
        headers = {**headers, "WWW-Authenticate": f'SAML realm="{record.realm}"'}
    return json_error(error.status, error.error, error.public_message, record.request_id, headers)


def log_access(request: web.BaseRequest, record: AccessRecord, status: int, seconds: float) -> None:
    """The request's access line (``gateway.logs.access``)."""
    upstream = record.upstream_seconds
    access(
        request.method,
        request.path,
        status,
        {
            "request_id": record.request_id,
            "method": request.method,
            "path": request.path,
            "route": record.route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "upstream_ms": None if upstream is None else round(upstream * 1000, 3),
            "cache": record.cache,
            "assertion_id": record.assertion_id,
            "issuer": record.issuer,
            "assertion_id_unverified": record.assertion_id_unverified,
            "issuer_unverified": record.issuer_unverified,
            "reason": record.reason,
            "detail": record.detail,
            "peer": request.remote,
            **({"trace_id": record.trace_id} if record.trace_id is not None else _NONE),
        },
    )
