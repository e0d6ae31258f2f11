"""The gateway's own errors: one shallow tree, each class knowing its HTTP status.

    GatewayError                      (never raised itself)
    ├── BadRequest            400     the request is not well-formed (assertion not base64,
    │                                 a header value that is not UTF-8)
    ├── InvalidAssertion      401     any reason to refuse the assertion, or none sent; one
    │                                 public message for each of the two
    ├── NoRoute               404     no route matches the request
    ├── RequestTooLarge       413     request body over the route's limit
    ├── NotImplementedHere    501     a request that cannot be relayed as sent
    ├── UpstreamError         502     authorization server or upstream misbehaved
    │   └── ServerFault       502     the authorization server failed (5xx) or was not reached:
    │                                 the one error the token exchange retries
    ├── Unavailable           503     authorization server asked us to back off
    └── UpstreamTimeout       504     authorization server or upstream did not answer in time

    ConfigError                       startup/reload error naming the key path (not HTTP)

Every error carries a machine-readable ``reason`` for logs and metrics, and says by its
type what may be done about it: ``retryable`` (another attempt at the token exchange may
succeed: nothing was consumed, the fault was passing) and ``remembered`` (the negative cache
may keep the refusal for this assertion, because asking again would get the same answer).
Only
``public_message`` ever reaches a client: the precise reason and ``detail`` stay
in logs, so a probing client learns nothing about which check failed.

Third-party exceptions are translated into these at the edge that meets them; only
the HTTP layer turns them into responses.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class GatewayError(Exception):
    status: int = 500
    error: str = "server_error"
    public_message: str = "the gateway could not handle this request"
    retryable: bool = False
    remembered: bool = False

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.headers: Mapping[str, str] = headers if headers is not None else _NO_HEADERS


class BadRequest(GatewayError):
    status = 400
    error = "invalid_request"
    public_message = "the request is malformed"


class InvalidAssertion(GatewayError):
    """Reasons: malformed, signature, wrapping, algorithm, expired, not_yet_valid, audience,
    issuer, recipient, subject_confirmation, dtd, size, missing, replay, spent, invalid_grant."""

    status = 401
    error = "invalid_token"
    public_message = "the SAML assertion was not accepted"

    # The validator also names the ``check`` that failed with what it ``expected`` and
    # ``found``; its ``detail`` is in the words of ``saml-gateway explain`` ("audience:
    # expected X, found Y"). It adds the assertion's ID and Issuer as read before anything
    # was verified (None when they could not be read): all for the log, never the client.
    # A missing assertion is told to the client as such.

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        check: str = "",
        expected: str = "",
        found: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(reason, detail, headers=headers)
        self.check = check
        self.expected = expected
        self.found = found
        self.unverified_id: str | None = None
        self.unverified_issuer: str | None = None
        if reason == "missing":
            self.public_message = "no SAML assertion in the request"
        # The authorization server's own refusal of this assertion: it would refuse it again.
        self.remembered = reason == "invalid_grant"


class NoRoute(GatewayError):
    status = 404
    error = "not_found"
    public_message = "no route matches this request"


class RequestTooLarge(GatewayError):
    status = 413
    error = "request_too_large"
    public_message = "the request body is larger than this route allows"


class NotImplementedHere(GatewayError):
    """A request the gateway cannot relay as sent (a transfer coding other than chunked)."""

    status = 501
    error = "not_implemented"
    public_message = "the gateway cannot forward this request as sent"


class UpstreamError(GatewayError):
    status = 502
    error = "bad_gateway"
    public_message = "an upstream service failed"


class ServerFault(UpstreamError):
    """The authorization server failed (5xx) or could not be reached: nothing was consumed
    that another attempt would miss, so the token exchange may be retried."""

    retryable = True


class Unavailable(GatewayError):
    status = 503
    error = "temporarily_unavailable"
    public_message = "the authorization server is temporarily unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    error = "gateway_timeout"
    public_message = "an upstream service did not answer in time"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` are ``key.path: what is wrong``."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems))
