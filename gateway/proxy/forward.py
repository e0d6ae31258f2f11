"""The streaming forwarder: one pooled client session, HTTP bodies streamed both ways.

A WebSocket handshake is handed to ``websocket``, TLS contexts come from ``tls`` and route
plans from ``upstream``. Rules this module owns (the header and URL rules live in ``headers``):
- Nothing is buffered, decoded or relabelled: request and response bodies pass chunk by
  chunk, with backpressure, byte for byte as sent (``Content-Encoding`` is the endpoints'
  business; the body limit counts bytes on the wire). What cannot be relayed exactly is
  refused, not altered: a transfer coding other than ``chunked`` (501 from a client, 502
  from an upstream) and a response header that is not UTF-8 (502).
- Nothing is followed or remembered: redirects go back to the client, cookies are not kept.
- Failures before the response starts become gateway errors (502/504/413) for the pipeline
  to answer; after it has started, the only honest signal is to cut the client connection,
  which is done quietly (one log line, no traceback) and without leaking the upstream one.
- aiohttp's exceptions are translated here (and in ``upstream``) and go no further.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

import aiohttp
from aiohttp import WSCloseCode, web
from multidict import MultiMapping

from gateway.config import ProxySettings, Route
from gateway.errors import (
    BadRequest,
    GatewayError,
    NotImplementedHere,
    RequestTooLarge,
    UpstreamError,
)
from gateway.proxy.headers import (
    IPNetwork,
    downstream_response_headers,
    is_utf8,
    token_rejected,
    upstream_request_headers,
    upstream_url,
)
from gateway.proxy.upstream import RoutePlans, UpstreamCall, upstream_failure
from gateway.proxy.websocket import UpgradeRefused, relay_websocket, wants_websocket

log = logging.getLogger(__name__)

_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})
_SMALL_BODY: Final = 64 * 1024  # bodies up to this size are relayed in one piece
_POOL_LIMIT: Final = 1000  # open upstream connections in total; beyond this requests queue
# aiohttp sets these on its own when absent; a proxy must send only what the client sent.
_NO_AUTO_HEADERS: Final = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(frozen=True, slots=True)
class ForwardResult:
    """What the pipeline learns from one forwarded request.

    ``response`` is already prepared and streamed (a 101 WebSocket included), or, for a
    small body read whole, ready for the handler to return;
    ``upstream_seconds`` runs from sending the request to the upstream's response headers.
    """

    response: web.StreamResponse
    upstream_status: int
    token_rejected: bool
    upstream_seconds: float


class Forwarder:
    """Sends requests to upstreams and streams their answers back."""

    def __init__(self, proxy: ProxySettings, routes: Sequence[Route]) -> None:
        self._proxy = proxy
        # Whose X-Forwarded-* headers are kept (and whose traceparent tracing continues).
        self.trusted_proxies: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in proxy.trusted_proxies
        )
        self._plans = RoutePlans(routes)  # TLS files are read now: bad ones fail at startup
        self._session: aiohttp.ClientSession | None = None
        self._websockets: set[aiohttp.ClientWebSocketResponse] = set()

    async def start(self) -> None:
        if self._session is not None:
            return
        header_limit = self._proxy.max_header_size
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=_POOL_LIMIT, limit_per_host=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            # Timeouts are the route's, given per request; none by default.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
            skip_auto_headers=_NO_AUTO_HEADERS,
            max_line_size=header_limit,
            max_field_size=header_limit,
            max_headers=max(self._proxy.max_headers, 128),
            trust_env=False,  # an HTTP_PROXY in the environment must not reroute upstream calls
        )

    async def close(self) -> None:
        for ws in list(self._websockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def admit(request: web.BaseRequest, route: Route) -> None:
        """Refuse, before any other work, a body declared larger than the route allows and
        one whose framing cannot be relayed as sent. Run once per request, before
        ``forward``: it is the only check of the request's transfer coding."""
        declared = request.content_length
        if declared is not None and declared > route.max_body_size:
            raise RequestTooLarge("body_too_large", f"Content-Length {declared}")
        coding = _foreign_transfer_coding(request.headers)
        if coding is not None:
            # aiohttp removes only the chunked framing; the upstream would get the body
            # still gzip-coded (say) and no header saying so (RFC 9112 §6.1: 501).
            raise NotImplementedHere("transfer_coding", f"Transfer-Encoding {coding!r}")

    async def forward(
        self,
        request: web.BaseRequest,
        route: Route,
        token: str,
        assertion_headers: frozenset[str],
        answer_headers: Mapping[str, str] = _NO_HEADERS,
        trace_headers: Mapping[str, str] = _NO_HEADERS,
    ) -> ForwardResult:
        """Forward ``request`` (``admit`` passed) to ``route``'s upstream with ``token``;
        stream the answer back.

        ``assertion_headers`` names the headers that may carry the assertion (never
        forwarded); ``answer_headers`` holds headers the gateway adds to the answer (its
        X-Request-ID), whatever the upstream said; its X-Request-ID also replaces the
        client's on the request sent upstream. ``trace_headers`` (tracing on: the gateway's
        ``traceparent``) replace the client's. Raises ``RequestTooLarge``, ``UpstreamError``
        or ``UpstreamTimeout`` when nothing has been sent to the client yet.
        """
        session = self._session
        if session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        plan = self._plans.plan(route)
        headers = upstream_request_headers(
            request.headers,
            token=token,
            assertion_headers=assertion_headers,
            peer=request.remote or "",
            scheme=request.scheme,
            host=request.headers.get("Host", ""),
            trusted_proxies=self.trusted_proxies,
            preserve_host=route.preserve_host,
            upstream_host=plan.upstream_host,
            # The upstream's logs then name the request as ours and the client's answer do.
            request_id=answer_headers.get("X-Request-ID"),
        )
        if trace_headers:
            headers.popall("tracestate", None)  # the client's belongs to the client's trace
            headers.update(trace_headers)
        url = upstream_url(
            route.upstream, request_target(request), route.path_prefix, route.strip_prefix
        )
        call = UpstreamCall(session, request, plan, url, headers, answer_headers)
        if not wants_websocket(request):
            return await _relay_http(call)
        try:
            response, elapsed = await relay_websocket(call, self._websockets)
        except UpgradeRefused as refused:
            return await _refused_upgrade(request, refused, answer_headers)
        return ForwardResult(
            response=response, upstream_status=101, token_rejected=False, upstream_seconds=elapsed
        )


def request_target(request: web.BaseRequest) -> str:
    """Path and query as the client sent them, still encoded (absolute-form reduced to them)."""
    target = request.raw_path
    return target if target.startswith("/") else request.rel_url.raw_path_qs


async def _relay_http(call: UpstreamCall) -> ForwardResult:
    """An ordinary request: sent with its body streamed, the answer relayed as it comes."""
    request = call.request
    upstream, elapsed = await _send(call)
    try:
        _check_relayable(upstream.headers)
    except UpstreamError:
        upstream.close()
        raise
    headers = downstream_response_headers(upstream.headers)
    headers.update(call.answer_headers)
    response: web.StreamResponse
    typed = "Content-Type" in upstream.headers
    if _read_whole(request, upstream):
        # A body announced as small is read whole and sent with the headers in one write
        # (memory stays bounded by _SMALL_BODY, as with nginx's proxy buffers); anything
        # larger or of unknown length is streamed.
        try:
            content = await upstream.read()
        except (aiohttp.ClientError, OSError) as exc:
            upstream.close()
            raise _failure(exc, None) from None
        response = _WholeAnswer(
            status=upstream.status, reason=upstream.reason, headers=headers, body=content
        )
        response.typed = typed
    else:
        response = _RelayedAnswer(status=upstream.status, reason=upstream.reason, headers=headers)
        response.typed = typed
        await _stream_answer(request, upstream, response)
    return ForwardResult(
        response=response,
        upstream_status=upstream.status,
        token_rejected=_token_refused(upstream.status, upstream.headers),
        upstream_seconds=elapsed,
    )


async def _send(call: UpstreamCall) -> tuple[aiohttp.ClientResponse, float]:
    """Send the request with its body streamed; the upstream's answer (headers read) and
    the seconds it took to come."""
    request, plan = call.request, call.plan
    upload = _Upload(limit=plan.route.max_body_size)
    body = _stream_body(request, upload) if request.body_exists else None
    if (
        body is not None
        and request.version >= aiohttp.HttpVersion11
        and request.headers.get("Expect", "").lower() == "100-continue"
    ):
        # The client waits for this before its upload; it comes only now, with the
        # assertion accepted, so a refused request never costs the client its body.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response itself has not started
    started = time.monotonic()
    try:
        upstream = await call.session.request(
            request.method,
            call.url,
            headers=call.headers,
            data=body,
            allow_redirects=False,
            timeout=plan.timeout,
            ssl=plan.ssl,
        )
    except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
        raise _failure(exc, upload) from None
    elapsed = time.monotonic() - started
    return upstream, elapsed


@dataclass(slots=True)
class _Upload:
    """The client's body on its way upstream: how much has gone, and why it stopped."""

    limit: int
    sent: int = 0
    too_large: bool = False
    client_failed: bool = False
    failure: str = field(default="")


async def _stream_body(request: web.BaseRequest, upload: _Upload) -> AsyncIterator[bytes]:
    """The client's body, chunk by chunk as it arrives, cut off past the route's limit."""
    try:
        async for chunk in request.content.iter_any():
            upload.sent += len(chunk)
            if upload.sent > upload.limit:
                upload.too_large = True
                break
            yield chunk
    except Exception as exc:
        upload.client_failed = True
        upload.failure = type(exc).__name__
        raise
    if upload.too_large:
        # Raising (not just stopping) makes aiohttp abandon the upstream request, so the
        # upstream never takes a truncated body for a complete one.
        raise _BodyOverLimit


class _BodyOverLimit(Exception):
    pass


def _failure(exc: BaseException, upload: _Upload | None) -> GatewayError:
    """An aiohttp/OS failure before the response started, as the gateway's own error."""
    if upload is not None and upload.too_large:
        return RequestTooLarge("body_too_large", f"more than {upload.limit} bytes streamed")
    if upload is not None and upload.client_failed:
        return BadRequest("request_body_incomplete", upload.failure)
    return upstream_failure(exc)


def _check_relayable(headers: MultiMapping[str]) -> None:
    """Refuse an upstream answer that cannot reach the client as it was sent.

    A header with bytes that are not UTF-8 (kept as surrogates by the parser) would lose
    them silently on the way out; a transfer coding other than chunked would reach the
    client undone and unlabelled.
    """
    for name, value in headers.items():
        if not is_utf8(value):
            raise UpstreamError("upstream_header_encoding", f"header {name!r} is not valid UTF-8")
    coding = _foreign_transfer_coding(headers)
    if coding is not None:
        raise UpstreamError("upstream_transfer_coding", f"Transfer-Encoding {coding!r}")


def _foreign_transfer_coding(headers: MultiMapping[str]) -> str | None:
    """The first transfer coding other than ``chunked`` in ``headers``, if any."""
    for value in headers.getall("Transfer-Encoding", ()):
        for coding in value.split(","):
            coding = coding.strip().lower()
            if coding and coding != "chunked":
                return coding
    return None


def _token_refused(status: int, headers: MultiMapping[str]) -> bool:
    """Whether the upstream's answer refuses the Bearer token itself (``token_rejected``)."""
    challenge = ", ".join(headers.getall("WWW-Authenticate", [])) or None
    return token_rejected(status, challenge)


def _read_whole(request: web.BaseRequest, upstream: aiohttp.ClientResponse) -> bool:
    length = upstream.content_length
    return (
        length is not None
        and length <= _SMALL_BODY
        and request.method != "HEAD"
        and upstream.status not in (204, 304)
        and upstream.status >= 200
    )


async def _stream_answer(
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
) -> None:
    complete = False
    written = 0
    side = "client"  # whose failure an exception means, by the step that raised it
    try:
        await response.prepare(request)
        chunks = upstream.content.iter_any().__aiter__()
        while True:
            side = "upstream"
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            side = "client"
            await response.write(chunk)
            written += len(chunk)
        side = "client"
        await response.write_eof()
        complete = True
    except (aiohttp.ClientError, OSError) as exc:  # TimeoutError included
        # Headers are out: a short body must not look complete, so the client
        # connection is cut (a chunked body then lacks its final chunk).
        log.log(
            logging.WARNING if side == "upstream" else logging.INFO,
            "response to %s %s cut after %d body bytes: %s failed (%s)",
            request.method,
            request.path,
            written,
            side,
            type(exc).__name__,
        )
        if request.transport is not None:
            request.transport.close()
    finally:
        # An unfinished upstream connection cannot be reused; a finished one goes back.
        if complete:
            upstream.release()
        else:
            upstream.close()


class _RelayedAnswer(web.StreamResponse):
    """An upstream's answer, with no header aiohttp would add on its own but ``Date``.

    aiohttp labels a body without ``Content-Type`` as ``application/octet-stream`` (a
    browser then downloads what it would have sniffed and shown) and names itself in
    ``Server``; a proxy relays what the upstream said. ``Date`` stays: RFC 9110 §6.6.1
    requires a forwarder to add one that is missing.
    """

    typed = True  # whether the upstream sent a Content-Type

    async def _prepare_headers(self) -> None:
        headers = self.headers
        had_server = "Server" in headers
        await super()._prepare_headers()
        if not self.typed:
            headers.popall("Content-Type", None)
        if not had_server:
            headers.popall("Server", None)


class _WholeAnswer(_RelayedAnswer, web.Response):
    """A small upstream answer read whole, relayed like ``_RelayedAnswer``."""


async def _refused_upgrade(
    request: web.BaseRequest, refused: UpgradeRefused, answer_headers: Mapping[str, str]
) -> ForwardResult:
    """The upstream answered the upgrade with an ordinary response: pass its status on."""
    upstream_headers = refused.headers
    _check_relayable(upstream_headers)
    headers = downstream_response_headers(upstream_headers)
    # aiohttp has discarded the body; its framing headers no longer apply.
    for name in ("Content-Length", "Content-Type", "Content-Encoding"):
        headers.popall(name, None)
    headers.update(answer_headers)
    response = _RelayedAnswer(status=refused.status, headers=headers)
    response.typed = False
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client left; nothing more to tell it
    return ForwardResult(
        response=response,
        upstream_status=refused.status,
        token_rejected=_token_refused(refused.status, upstream_headers),
        upstream_seconds=refused.elapsed,
    )
