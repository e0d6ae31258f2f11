"""The streaming forwarder: one pooled client session, bodies streamed both ways, WebSockets too.

Rules this module owns (the header and URL rules themselves live in ``headers``):
- Nothing is buffered, decoded or relabelled: request and response bodies pass chunk by
  chunk, with backpressure, byte for byte as sent (``Content-Encoding`` is the endpoints'
  business; the body limit counts bytes on the wire). What cannot be relayed exactly is
  refused, not altered: a transfer coding other than ``chunked`` (501 from a client, 502
  from an upstream) and a response header that is not UTF-8 (502).
- Nothing is followed or remembered: redirects go back to the client, cookies are not kept.
- Failures before the response starts become gateway errors (502/504/413) for the pipeline
  to answer; after it has started, the only honest signal is to cut the client connection,
  which is done quietly (one log line, no traceback) and without leaking the upstream one.
- aiohttp's exceptions are translated here and go no further.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from gateway.config import ProxySettings, Route, UpstreamTls
from gateway.errors import (
    BadRequest,
    ConfigError,
    GatewayError,
    NotImplementedHere,
    RequestTooLarge,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.proxy.headers import (
    IPNetwork,
    downstream_response_headers,
    token_rejected,
    upstream_request_headers,
    upstream_url,
)

log = logging.getLogger(__name__)

_NO_STAMP: Final[Mapping[str, str]] = MappingProxyType({})
_SMALL_BODY: Final = 64 * 1024  # bodies up to this size are relayed in one piece
_POOL_LIMIT: Final = 1000  # open upstream connections in total; beyond this requests queue
_WS_CLOSE_TIMEOUT: Final = 5.0  # how long a close handshake may take on either side
_WS_MAX_MESSAGE: Final = 16 * 1024 * 1024
# The gateway's WebSocket handshake with the upstream is its own: the client's key, version
# and extension offers belong to the client's handshake with us.
_WS_HANDSHAKE_HEADERS: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)
# Close codes that may appear in a close frame (RFC 6455 §7.4); 1005/1006/1015 may not.
_SENDABLE_CLOSE: Final = frozenset({*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)})
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


@dataclass(frozen=True, slots=True)
class _RoutePlan:
    """What a route needs per request, worked out once."""

    route: Route
    upstream_host: str  # host[:port] for the Host header
    ssl: ssl.SSLContext | bool
    timeout: aiohttp.ClientTimeout
    handshake_timeout: float
    websocket_idle: float | None
    websocket_lifetime: float | None


@dataclass(slots=True)
class _BodyProgress:
    limit: int
    sent: int = 0
    too_large: bool = False
    client_failed: bool = False
    failure: str = field(default="")


def tls_context(tls: UpstreamTls, where: str = "tls") -> ssl.SSLContext:
    """The client-side TLS context for an upstream: CA bundle, client certificate, checks.

    Raises ``ConfigError`` naming ``where`` when a file cannot be used.
    """
    try:
        # A configured CA bundle replaces the system store: that is what pinning a private CA
        # means; verification stays on unless the operator turns it off explicitly.
        context = ssl.create_default_context(cafile=tls.ca_file)
        if not tls.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError([f"{where}: cannot use the TLS files: {exc}"]) from None
    return context


class Forwarder:
    """Sends requests to upstreams and streams their answers back."""

    def __init__(self, proxy: ProxySettings, routes: Sequence[Route]) -> None:
        self._proxy = proxy
        self._trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in proxy.trusted_proxies
        )
        self.trusted_proxies = self._trusted  # also whose traceparent tracing continues
        # One TLS context per distinct setting, built now so bad files fail at startup.
        self._tls: dict[UpstreamTls, ssl.SSLContext] = {}
        self._plans: dict[int, _RoutePlan] = {}
        for i, route in enumerate(routes):
            self._plans[id(route)] = self._make_plan(route, f"routes[{i}].tls")
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
        one whose framing cannot be relayed as sent."""
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
        strip: frozenset[str],
        stamp: Mapping[str, str] = _NO_STAMP,
        trace_headers: Mapping[str, str] = _NO_STAMP,
    ) -> ForwardResult:
        """Forward ``request`` to ``route``'s upstream with ``token``; stream the answer back.

        ``strip`` names the headers that carried the assertion; ``stamp`` holds headers the
        gateway adds to the answer (its X-Request-ID), whatever the upstream said; its
        X-Request-ID also replaces the client's on the request sent upstream. Raises
        ``RequestTooLarge``, ``UpstreamError`` or ``UpstreamTimeout`` when nothing has been
        sent to the client yet. ``trace_headers`` (tracing on: the gateway's ``traceparent``)
        replace the client's.
        """
        session = self._session
        if session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        plan = self._plan(route)
        headers = upstream_request_headers(
            request.headers,
            token=token,
            strip=strip,
            peer=request.remote or "",
            scheme=request.scheme,
            host=request.headers.get("Host", ""),
            trusted_proxies=self._trusted,
            preserve_host=route.preserve_host,
            upstream_host=plan.upstream_host,
            # The upstream's logs then name the request as ours and the client's answer do.
            request_id=stamp.get("X-Request-ID"),
        )
        if trace_headers:
            headers.popall("tracestate", None)  # the client's belongs to the client's trace
            headers.update(trace_headers)
        url = upstream_url(
            route.upstream, request_target(request), route.path_prefix, route.strip_prefix
        )
        if wants_websocket(request):
            return await self._websocket(session, request, plan, url, headers, stamp)
        return await self._http(session, request, plan, url, headers, stamp)

    # --- plain HTTP ---------------------------------------------------------------------

    async def _http(
        self,
        session: aiohttp.ClientSession,
        request: web.BaseRequest,
        plan: _RoutePlan,
        url: URL,
        headers: CIMultiDict[str],
        stamp: Mapping[str, str],
    ) -> ForwardResult:
        progress = _BodyProgress(limit=plan.route.max_body_size)
        body = _stream_body(request, progress) if request.body_exists else None
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
            upstream = await session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=plan.timeout,
                ssl=plan.ssl,
            )
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            raise _translate(exc, progress) from None
        elapsed = time.monotonic() - started

        try:
            _check_relayable(upstream.headers)
        except UpstreamError:
            upstream.close()
            raise
        challenge = ", ".join(upstream.headers.getall("WWW-Authenticate", [])) or None
        headers = downstream_response_headers(upstream.headers)
        headers.update(stamp)
        response: web.StreamResponse
        typed = "Content-Type" in upstream.headers
        if _small_body(request, upstream):
            # A body announced as small is read whole and sent with the headers in one write
            # (memory stays bounded by _SMALL_BODY, as with nginx's proxy buffers); anything
            # larger or of unknown length is streamed.
            try:
                content = await upstream.read()
            except (aiohttp.ClientError, OSError) as exc:
                upstream.close()
                raise _translate(exc, None) from None
            response = _RelayedResponse(
                status=upstream.status, reason=upstream.reason, headers=headers, body=content
            )
            response.typed = typed
        else:
            response = _Relayed(status=upstream.status, reason=upstream.reason, headers=headers)
            response.typed = typed
            await self._relay_body(request, upstream, response)
        return ForwardResult(
            response=response,
            upstream_status=upstream.status,
            token_rejected=token_rejected(upstream.status, challenge),
            upstream_seconds=elapsed,
        )

    async def _relay_body(
        self,
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

    # --- WebSocket ----------------------------------------------------------------------

    async def _websocket(
        self,
        session: aiohttp.ClientSession,
        request: web.BaseRequest,
        plan: _RoutePlan,
        url: URL,
        headers: CIMultiDict[str],
        stamp: Mapping[str, str],
    ) -> ForwardResult:
        for name in list(headers.keys()):
            if name.lower() in _WS_HANDSHAKE_HEADERS:
                del headers[name]
        offered = tuple(
            protocol.strip()
            for value in request.headers.getall("Sec-WebSocket-Protocol", [])
            for protocol in value.split(",")
            if protocol.strip()
        )
        started = time.monotonic()
        try:
            async with asyncio.timeout(plan.handshake_timeout):
                upstream_ws = await session.ws_connect(
                    url,
                    headers=headers,
                    protocols=offered,
                    ssl=plan.ssl,
                    autoclose=True,
                    autoping=True,
                    max_msg_size=_WS_MAX_MESSAGE,
                    timeout=aiohttp.ClientWSTimeout(ws_close=_WS_CLOSE_TIMEOUT),
                )
        except aiohttp.WSServerHandshakeError as exc:
            return await self._refused_upgrade(request, exc, time.monotonic() - started, stamp)
        except (aiohttp.ClientError, OSError) as exc:
            raise _translate(exc, None) from None
        elapsed = time.monotonic() - started

        self._websockets.add(upstream_ws)
        try:
            chosen = (upstream_ws.protocol,) if upstream_ws.protocol else ()
            client_ws = web.WebSocketResponse(
                protocols=chosen,
                autoclose=True,
                autoping=True,
                max_msg_size=_WS_MAX_MESSAGE,
                timeout=_WS_CLOSE_TIMEOUT,
            )
            client_ws.headers.update(stamp)
            try:
                await client_ws.prepare(request)
            except (ConnectionError, web.HTTPException):
                await upstream_ws.close(code=WSCloseCode.GOING_AWAY)
                raise UpstreamError("client_websocket_handshake", "client went away") from None
            await _relay_websocket(
                client_ws, upstream_ws, plan.websocket_idle, plan.websocket_lifetime
            )
        finally:
            self._websockets.discard(upstream_ws)
            await upstream_ws.close()
        return ForwardResult(
            response=client_ws, upstream_status=101, token_rejected=False, upstream_seconds=elapsed
        )

    async def _refused_upgrade(
        self,
        request: web.BaseRequest,
        exc: aiohttp.WSServerHandshakeError,
        elapsed: float,
        stamp: Mapping[str, str],
    ) -> ForwardResult:
        """The upstream answered the upgrade with an ordinary response: pass its status on."""
        if exc.status < 200:
            raise UpstreamError("upstream_websocket_handshake", exc.message) from None
        upstream_headers = exc.headers if exc.headers is not None else CIMultiDict[str]()
        _check_relayable(upstream_headers)
        headers = downstream_response_headers(upstream_headers)
        # aiohttp has discarded the body; its framing headers no longer apply.
        for name in ("Content-Length", "Content-Type", "Content-Encoding"):
            headers.popall(name, None)
        headers.update(stamp)
        response = _Relayed(status=exc.status, headers=headers)
        response.typed = False
        challenge = ", ".join(upstream_headers.getall("WWW-Authenticate", [])) or None
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            pass  # the client left; nothing more to tell it
        return ForwardResult(
            response=response,
            upstream_status=exc.status,
            token_rejected=token_rejected(exc.status, challenge),
            upstream_seconds=elapsed,
        )

    # --- route plans --------------------------------------------------------------------

    def _plan(self, route: Route) -> _RoutePlan:
        plan = self._plans.get(id(route))
        if plan is None or plan.route is not route:
            try:
                plan = self._make_plan(route, "route.tls")
            except ConfigError as exc:
                raise UpstreamError("upstream_tls_config", str(exc)) from None
            self._plans[id(route)] = plan
        return plan

    def _make_plan(self, route: Route, where: str) -> _RoutePlan:
        base = URL(route.upstream)
        tls: ssl.SSLContext | bool = True  # plain http: unused
        if base.scheme == "https":
            context = self._tls.get(route.tls)
            if context is None:
                context = self._tls[route.tls] = tls_context(route.tls, where)
            tls = context
        limits = route.timeouts
        return _RoutePlan(
            route=route,
            upstream_host=base.host_port_subcomponent or base.raw_host or "",
            ssl=tls,
            timeout=aiohttp.ClientTimeout(
                total=limits.total, sock_connect=limits.connect, sock_read=limits.read
            ),
            handshake_timeout=min(limits.total, limits.connect + limits.read),
            websocket_idle=limits.websocket_idle,
            websocket_lifetime=limits.websocket_lifetime,
        )


class _Relayed(web.StreamResponse):
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


class _RelayedResponse(_Relayed, web.Response):
    """A small upstream answer read whole, relayed like ``_Relayed``."""


def _foreign_transfer_coding(headers: MultiMapping[str]) -> str | None:
    """The first transfer coding other than ``chunked`` in ``headers``, if any."""
    for value in headers.getall("Transfer-Encoding", ()):
        for coding in value.split(","):
            coding = coding.strip().lower()
            if coding and coding != "chunked":
                return coding
    return None


def _check_relayable(headers: MultiMapping[str]) -> None:
    """Refuse an upstream answer that cannot reach the client as it was sent.

    A header with bytes that are not UTF-8 (kept as surrogates by the parser) would lose
    them silently on the way out; a transfer coding other than chunked would reach the
    client undone and unlabelled.
    """
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise UpstreamError(
                    "upstream_header_encoding", f"header {name!r} is not valid UTF-8"
                ) from None
    coding = _foreign_transfer_coding(headers)
    if coding is not None:
        raise UpstreamError("upstream_transfer_coding", f"Transfer-Encoding {coding!r}")


def request_target(request: web.BaseRequest) -> str:
    """Path and query as the client sent them, still encoded (absolute-form reduced to them)."""
    target = request.raw_path
    return target if target.startswith("/") else request.rel_url.raw_path_qs


def wants_websocket(request: web.BaseRequest) -> bool:
    """Whether ``request`` is a well-formed WebSocket handshake (relayed as one)."""
    if request.method != "GET":
        return False
    upgrade = request.headers.get("Upgrade", "").lower()
    if not upgrade:
        return False
    connection = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    if "websocket" not in upgrade or "upgrade" not in connection:
        return False
    # A malformed handshake is forwarded as the plain GET it then is.
    return web.WebSocketResponse().can_prepare(request).ok


async def _stream_body(request: web.BaseRequest, progress: _BodyProgress) -> AsyncIterator[bytes]:
    """The client's body, chunk by chunk as it arrives, cut off past the route's limit."""
    try:
        async for chunk in request.content.iter_any():
            progress.sent += len(chunk)
            if progress.sent > progress.limit:
                progress.too_large = True
                break
            yield chunk
    except Exception as exc:
        progress.client_failed = True
        progress.failure = type(exc).__name__
        raise
    if progress.too_large:
        # Raising (not just stopping) makes aiohttp abandon the upstream request, so the
        # upstream never takes a truncated body for a complete one.
        raise _BodyOverLimit


class _BodyOverLimit(Exception):
    pass


def _small_body(request: web.BaseRequest, upstream: aiohttp.ClientResponse) -> bool:
    length = upstream.content_length
    return (
        length is not None
        and length <= _SMALL_BODY
        and request.method != "HEAD"
        and upstream.status not in (204, 304)
        and upstream.status >= 200
    )


def _translate(exc: BaseException, progress: _BodyProgress | None) -> GatewayError:
    """An aiohttp/OS failure before the response started, as the gateway's own error."""
    if progress is not None and progress.too_large:
        return RequestTooLarge("body_too_large", f"more than {progress.limit} bytes streamed")
    if progress is not None and progress.client_failed:
        return BadRequest("request_body_incomplete", progress.failure)
    detail = type(exc).__name__
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("upstream_timeout", detail)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return UpstreamError("upstream_tls", f"{detail}: {exc}")
    if isinstance(exc, aiohttp.ClientResponseError):
        # the message may quote whatever the upstream sent: keep logs short
        return UpstreamError("upstream_invalid_response", f"{detail}: {exc.message[:120]!r}")
    return UpstreamError("upstream_unreachable", f"{detail}: {str(exc)[:200]}")


def _close_code(code: int | None, fallback: int) -> int:
    return code if code is not None and code in _SENDABLE_CLOSE else fallback


async def _relay_websocket(
    client: web.WebSocketResponse,
    upstream: aiohttp.ClientWebSocketResponse,
    idle: float | None = None,
    lifetime: float | None = None,
) -> None:
    """Relay messages both ways until one side closes; pass its close code to the other.

    ``idle`` and ``lifetime`` (the route's ``websocket_idle``/``websocket_lifetime``) are the
    only bounds: past either, both sides are closed with 1001.
    """
    loop = asyncio.get_running_loop()
    last_message = loop.time()

    async def pump(
        source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        lost_code: int,
    ) -> None:
        nonlocal last_message
        try:
            while True:
                msg = await source.receive()
                last_message = loop.time()
                if msg.type is WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
                elif msg.type is WSMsgType.CLOSE:
                    reason = (msg.extra or "").encode()[:123]  # a close reason fits 123 bytes
                    await sink.close(code=_close_code(msg.data, WSCloseCode.OK), message=reason)
                    return
                elif msg.type is WSMsgType.CLOSING:
                    return  # the other pump is closing this side
                else:  # CLOSED or ERROR: the connection is gone without a close frame
                    await sink.close(code=lost_code)
                    return
        except (aiohttp.ClientError, OSError, RuntimeError):
            # RuntimeError: aiohttp refuses to send on a socket that is already closing.
            await sink.close(code=lost_code)

    async def watch() -> None:
        """Close both sides once the socket has idled or lived past its route's bound."""
        end = loop.time() + lifetime if lifetime is not None else None
        while True:
            idle_end = last_message + idle if idle is not None else None
            due = [t for t in (end, idle_end) if t is not None]
            wait = min(due) - loop.time()
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        lived = end is not None and loop.time() >= end
        reason = b"websocket lifetime reached" if lived else b"websocket idle"
        await asyncio.gather(
            client.close(code=WSCloseCode.GOING_AWAY, message=reason),
            upstream.close(code=WSCloseCode.GOING_AWAY, message=reason),
            return_exceptions=True,
        )

    tasks = [
        asyncio.create_task(pump(client, upstream, WSCloseCode.GOING_AWAY)),
        asyncio.create_task(pump(upstream, client, WSCloseCode.BAD_GATEWAY)),
    ]
    if idle is not None or lifetime is not None:
        tasks.append(asyncio.create_task(watch()))
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending:  # the other side is being closed; let its pump see that
            await asyncio.wait(tasks[:2], timeout=_WS_CLOSE_TIMEOUT)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
