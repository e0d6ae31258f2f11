"""Wiring and lifecycle: the proxy listener, the admin listener, reload and drain.

Lifecycle rules:
- SIGTERM: ``/readyz`` answers 503 at once; the listener keeps serving for
  ``lifecycle.shutdown_grace`` (so load balancers notice), then stops accepting and lets
  in-flight requests finish for up to ``lifecycle.drain_timeout``.
- SIGHUP: the config file is read again; a file that fails to load is reported and the
  running configuration stays. Listener addresses, workers and cache settings need a restart.
- The token cache outlives reloads, so a reload never costs a re-exchange.
- A reload sends new requests to the new configuration; the retired one finishes its HTTP
  requests (for as long as its timeouts allow) and keeps its WebSockets until they end,
  bounded only by their route's ``websocket_idle``/``websocket_lifetime``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import StreamReader, web

from gateway.access import (
    AccessRecord,
    error_response,
    json_error,
    log_access,
    note_failure,
    request_id,
)
from gateway.authorizer import authorize
from gateway.cache import TokenCache
from gateway.config import Config, load_config
from gateway.errors import BadRequest, ConfigError, GatewayError, NoRoute
from gateway.logs import ACCESS
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.proxy.websocket import wants_websocket
from gateway.routing import under_prefix
from gateway.tracing import Tracing

if TYPE_CHECKING:
    from gateway.cache.entry import SharedStore
    from gateway.cache.redis import RedisTokenStore

log = logging.getLogger("gateway")

# Idle client connections are closed after this (aiohttp's default is an hour).
_KEEPALIVE_SECONDS = 75.0
_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _Inside:
    """Requests of one kind inside a pipeline, counted while a ``with`` block runs."""

    __slots__ = ("count", "none")

    def __init__(self) -> None:
        self.count = 0
        self.none = asyncio.Event()
        self.none.set()

    def __enter__(self) -> None:
        self.count += 1
        self.none.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1
        if not self.count:
            self.none.set()


class InFlight:
    """The requests inside one pipeline: a retired one closes its sessions only when idle.
    WebSockets are counted apart (for their whole life): HTTP timeouts do not bound them,
    so neither does the wait for them after a reload."""

    def __init__(self) -> None:
        self.requests = _Inside()
        self.websockets = _Inside()

    async def drained(self, longest: float) -> None:
        """Return once nothing is inside: HTTP requests are waited for ``longest`` seconds at
        most (as long as any could take); WebSockets until they end (a route's
        ``websocket_idle`` and ``websocket_lifetime`` bound them, nothing else), so a reload
        never cuts one."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.requests.none.wait(), longest)
        await self.websockets.none.wait()


class _Connection(web.RequestHandler):
    """aiohttp's handler of one client connection, with two changes.

    - A request aiohttp cannot even parse is answered by aiohttp itself, quoting the bad
      line back, and that line may be the assertion header: answer with our JSON error.
    - Header lines may be long (a signed assertion), so every request head on the
      connection is bounded as a whole (``head_limit`` bytes, against aiohttp's 100 lines
      of that length), pipelined or not: the bytes of a head sent while an earlier request
      is still in the handler count too. A client that opens a connection and never
      finishes its first head is cut after ``FIRST_HEAD_SECONDS`` (later heads are bounded
      by the keep-alive timeout).
    """

    FIRST_HEAD_SECONDS = 15.0
    head_limit = 256 * 1024
    _head_deadline: asyncio.TimerHandle | None = None
    _head_bytes = 0  # bytes of the request head being received, so far
    _head_tail = b""  # the last bytes of that head, for an end split across two reads
    # The body of the newest request parsed, while the parser reads it: bytes meanwhile are
    # body bytes; once it has ended (at once for a request without one), head bytes again.
    _body: StreamReader | None = None

    def data_received(self, data: bytes) -> None:
        in_head = not self._upgraded and (self._body is None or self._body.is_eof())
        if in_head and self._head_bytes + len(data) > self.head_limit:
            # This read may end the head and go on with a body: only up to the head's end
            # counts now (what comes after a head that ends here is at most one read).
            end = (self._head_tail + data).find(b"\r\n\r\n")
            part = len(data) if end < 0 else end + 4 - len(self._head_tail)
            if self._head_bytes + part > self.head_limit:
                # Nothing of this head reaches the parser, so it can never be handled.
                self.force_close()
                return
        requests = self._request_count
        super().data_received(data)
        if self._request_count != requests:  # a head ended in this read
            self._head_bytes, self._head_tail = 0, b""
            self._body = self._messages[-1][1] if self._messages else None
        elif in_head:
            self._head_bytes += len(data)
            self._head_tail = (self._head_tail + data)[-3:]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._head_deadline = loop.call_later(self.FIRST_HEAD_SECONDS, self._head_overdue)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _head_overdue(self) -> None:
        if self._request_count == 0:  # no complete request head yet
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, None)  # aiohttp's logging and its checks
        error: GatewayError = (
            BadRequest("unparseable", "") if status < 500 else GatewayError("internal", "")
        )
        response = json_error(status, error.error, error.public_message, request_id(None))
        response.force_close()
        return response


class _Server(web.Server):
    head_limit = _Connection.head_limit

    def __call__(self) -> web.RequestHandler:
        # aiohttp's own factory, with the handler class above (Server keeps its arguments in
        # _loop and _kwargs; aiohttp is pinned below 4).
        connection = _Connection(self, loop=self._loop, **self._kwargs)
        connection.head_limit = self.head_limit
        return connection


class GatewayServer:
    """One gateway process: build with a config, ``start()``, later ``shutdown()``."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | Path | None = None,
        reuse_port: bool = False,
        host_store: SharedStore | None = None,
    ) -> None:
        self.config = config
        # Listeners, workers and cache are set up once, from this; a reload does not change them.
        self.started_config = config
        self.config_path = Path(config_path) if config_path else None
        self.reuse_port = reuse_port
        self.metrics = Metrics()
        self.shared = self._shared_store(config)
        # The workers of one host share tokens through the supervisor's store, unless Redis
        # does it for every replica already.
        self.host_store = host_store if self.shared is None else None
        self.cache = TokenCache(
            config.cache,
            shared=self.shared or self.host_store,
            shared_wait=self._shared_wait(config),
        )
        self.metrics.watch_cache(lambda: self.cache)
        self.tracing = Tracing.from_config(config)  # read once: a reload keeps it
        self.pipeline = Pipeline(config, self.cache, self.metrics, self.tracing)
        self.inflight = InFlight()  # the requests inside self.pipeline
        self.draining = False
        self._hurry = asyncio.Event()
        self._retired: set[asyncio.Task[None]] = set()
        self._runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._auth_runner: web.ServerRunner | None = None
        self.port = 0
        self.admin_port = 0
        self.auth_port = 0

    def _shared_store(self, config: Config) -> RedisTokenStore | None:
        if config.cache.backend != "redis" or config.cache.redis is None:
            return None
        from gateway.cache.redis import RedisTokenStore  # only deployments with Redis load it

        return RedisTokenStore(config.cache.redis, on_state=self.metrics.observe_redis)

    def _shared_wait(self, config: Config) -> float:
        if self.shared is not None and config.cache.redis is not None:
            return config.cache.redis.lock_wait
        if self.host_store is not None:
            from gateway.cache.sqlite import RESULT_WAIT

            return RESULT_WAIT
        return 0.0

    # --- HTTP ------------------------------------------------------------------------------

    def _handler(self, *, proxy: bool, forward_auth: bool) -> _Handler:
        """The one handler of a listener: the proxy, the forward-auth endpoint, or both.

        aiohttp's low-level server calls it directly (no router, middleware or signals on
        the hot path); it owns the request's access record, its errors and its accounting.
        """
        # Listener settings are fixed at start; a reload that changes them says so.
        auth = self.config.forward_auth
        auth_path = auth.path.rstrip("/") if forward_auth else None
        tracing = self.tracing

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            record = AccessRecord(request_id(request.headers.get("X-Request-ID")))
            pipeline, inflight = self.pipeline, self.inflight  # a reload swaps both at once
            if tracing is not None:
                tracing.start_request(request, record, pipeline.forwarder.trusted_proxies)
            status = 500
            response: web.StreamResponse
            try:
                if auth_path is not None and under_prefix(request.path, auth_path):
                    with inflight.requests:
                        response = await authorize(pipeline, request, record, auth)
                elif proxy:
                    upgrade = wants_websocket(request)
                    with inflight.websockets if upgrade else inflight.requests:
                        response = await pipeline.proxy(request, record)
                else:
                    raise NoRoute("no_route", "only forward-auth is served on this listener")
                status = response.status
                return response
            except GatewayError as error:
                note_failure(record, error, self.metrics.validation_failures)
                status = error.status
                return error_response(error, record)
            except asyncio.CancelledError:
                status = 499  # the client went away; nothing left to answer
                raise
            except Exception:
                log.exception(
                    "unexpected error", extra={"fields": {"request_id": record.request_id}}
                )
                record.reason = "internal"
                return json_error(500, "server_error", "internal error", record.request_id)
            finally:
                self._account(request, record, status)

        return handle

    def _account(self, request: web.BaseRequest, record: AccessRecord, status: int) -> None:
        seconds = time.perf_counter() - record.started
        self.metrics.observe_request(record.route, status, seconds)
        if self.tracing is not None:
            self.tracing.finish_request(request, record, status)
        if ACCESS.isEnabledFor(logging.INFO):
            log_access(request, record, status, seconds)

    def _server(self, *, proxy: bool, forward_auth: bool) -> _Server:
        config = self.config
        # Signed assertions are often far larger than aiohttp's 8 KB default; leave room for
        # an over-cap assertion to arrive, so it is refused with a clear 401 (reason "size").
        header_limit = max(config.proxy.max_header_size, config.assertion.max_size + 1024)
        server = _Server(
            self._handler(proxy=proxy, forward_auth=forward_auth),
            access_log=None,
            keepalive_timeout=_KEEPALIVE_SECONDS,
            max_line_size=header_limit,
            max_field_size=header_limit,
            max_headers=config.proxy.max_headers,
            # Bodies are relayed as sent: a decoded body would reach the upstream still
            # labelled with its Content-Encoding and Content-Length, and the body limit
            # would count inflated bytes instead of the bytes on the wire.
            auto_decompress=False,
        )
        # A whole head: one assertion-sized line, and 64 KiB for all the other headers.
        server.head_limit = header_limit + 64 * 1024
        return server

    # --- admin -----------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {"status": "ready"}
        ready = not self.draining
        if self.draining:
            body["status"] = "draining"
        if self.shared is not None:
            # A bounded ping (instant while Redis is known down), so an idle replica still
            # notices Redis going away and coming back.
            healthy = await self.shared.ping()
            body["redis"] = "up" if healthy else "down"
            redis = self.config.cache.redis
            if not healthy and redis is not None and redis.required_for_readiness:
                ready, body["status"] = False, "redis_down"
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    def build_admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        await self.pipeline.start()
        if self.shared is not None and not await self.shared.ping():
            log.warning("Redis does not answer; serving from memory until it does")
        auth = config.forward_auth
        own_auth_listener = auth.enabled and auth.listen is not None
        if auth.enabled and not own_auth_listener:
            log.warning(
                "forward_auth shares the proxy listener: any client with an accepted assertion "
                "can read its access token from %s; give forward_auth its own 'listen', "
                "reachable only by the proxy in front",
                auth.path,
            )
        self._runner = self._serving_runner(
            proxy=True, forward_auth=auth.enabled and not own_auth_listener
        )
        self.port = await self._listen(self._runner, config.listen.host, config.listen.port)
        if own_auth_listener and auth.listen is not None:
            self._auth_runner = self._serving_runner(proxy=False, forward_auth=True)
            self.auth_port = await self._listen(
                self._auth_runner, auth.listen.host, auth.listen.port
            )
        if config.admin.enabled:
            self._admin_runner = web.AppRunner(self.build_admin_app(), access_log=None)
            self.admin_port = await self._listen(
                self._admin_runner, config.admin.host, config.admin.port
            )
        log.info(
            "gateway listening",
            extra={
                "fields": {
                    "port": self.port,
                    "admin_port": self.admin_port,
                    "routes": len(config.routes),
                }
            },
        )

    def _serving_runner(self, *, proxy: bool, forward_auth: bool) -> web.ServerRunner:
        return web.ServerRunner(
            self._server(proxy=proxy, forward_auth=forward_auth),
            shutdown_timeout=self.config.lifecycle.drain_timeout,
        )

    async def _listen(self, runner: web.BaseRunner, host: str, port: int) -> int:
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_port=self.reuse_port).start()
        return int(runner.addresses[0][1])

    async def reload(self) -> bool:
        """Load the config file again; keep the running one if the new one is broken."""
        if self.config_path is None:
            return False
        try:
            config = load_config(self.config_path)
            pipeline = Pipeline(config, self.cache, self.metrics, self.tracing)
        except ConfigError as exc:
            self.metrics.reloads.labels("failed").inc()
            log.error(
                "config reload failed; keeping the running configuration",
                extra={"fields": {"problems": exc.problems, "file": str(self.config_path)}},
            )
            return False
        for key in ("listen", "admin", "workers", "cache", "forward_auth", "telemetry"):
            # Compared with what runs, not with the last file: a reload that puts back the
            # running value has nothing to warn about.
            if getattr(config, key) != getattr(self.started_config, key):
                log.warning("config key %r changed: it takes effect at the next restart", key)
        await pipeline.start()
        self._forget_changed_trust(pipeline)
        retired = self._retire(self.pipeline, self.inflight)
        self.pipeline, self.inflight, self.config = pipeline, InFlight(), config
        # Requests already inside the old pipeline finish with it; close it after they drain.
        task = asyncio.create_task(retired)
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        self.metrics.reloads.labels("ok").inc()
        log.info("config reloaded", extra={"fields": {"routes": len(config.routes)}})
        return True

    def _forget_changed_trust(self, pipeline: Pipeline) -> None:
        """Tokens are served from memory without re-validation: those obtained under a trust
        or server settings that the reload changed (their cache key changed with them) must
        not outlive it. Redis needs nothing: its entries are named by the key."""
        kept = set(pipeline.cache_keys.values())
        for (idp, server), key in self.pipeline.cache_keys.items():
            if key in kept:
                continue
            dropped = self.cache.forget(key)
            if dropped:
                fields = {"identity_provider": idp, "authorization_server": server}
                log.info(
                    "trust or server settings changed: cached tokens dropped",
                    extra={"fields": {**fields, "tokens": dropped}},
                )

    @staticmethod
    async def _retire(pipeline: Pipeline, inflight: InFlight) -> None:
        # Closing its client session would cut its WebSockets: only once they have ended.
        try:
            await inflight.drained(pipeline.longest_request())
        finally:  # also at shutdown, when the wait is cancelled: its sessions must close
            await pipeline.close()

    async def shutdown(self) -> None:
        """Graceful stop: not ready at once, serve through the grace period, then drain."""
        self.draining = True
        grace = self.config.lifecycle.shutdown_grace
        log.info("draining", extra={"fields": {"grace_s": grace}})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), grace)
        await self.close()

    def hurry(self) -> None:
        """A second stop signal: skip what is left of the grace period (in-flight still drain)."""
        self._hurry.set()

    async def close(self) -> None:
        self.draining = True
        # Both listeners drain together: one stops accepting while the other drains would
        # let shutdown take twice drain_timeout, and serve new requests meanwhile.
        runners = [r for r in (self._runner, self._auth_runner) if r is not None]
        await asyncio.gather(*(runner.cleanup() for runner in runners))
        self._runner = self._auth_runner = None
        retired = list(self._retired)
        for task in retired:
            task.cancel()
        await asyncio.gather(*retired, return_exceptions=True)
        await self.pipeline.close()
        if self.tracing is not None:  # sends what is buffered (a blocking call, bounded)
            await asyncio.to_thread(self.tracing.shutdown)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.cache.close()
        if self.shared is not None:
            await self.shared.close()
        if self.host_store is not None:
            await self.host_store.close()
        log.info("stopped")
