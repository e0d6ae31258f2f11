"""OpenTelemetry traces (``telemetry.tracing``, the ``otel`` extra), exported over OTLP/HTTP.

One server span per request, with child spans for the assertion's validation, each attempt
of a token exchange and the upstream call; the requests to the authorization server and the
upstream carry a W3C ``traceparent`` of the same trace. An inbound ``traceparent`` is
continued only from a peer in ``proxy.trusted_proxies`` (anyone else could pick trace IDs
and force sampling); otherwise the request starts a new trace.

Attributes are the HTTP semantic conventions' (method, path, status, peer) and the
gateway's (route, cache outcome, refusal reason, assertion ID, authorization server and
outcome): never the assertion, a token, a secret or a header's value. Exceptions are not
recorded (their text may quote what a client sent); a failure sets the reason word.

Disabled (the default), OpenTelemetry is never imported: the request path's child spans go
to ``UNTRACED``, whose hooks do nothing, so the path is written once for both.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from gateway.config import Config
from gateway.errors import ConfigError, GatewayError
from gateway.proxy.headers import IPNetwork, peer_is_trusted

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.trace import Span


EXTRA = "pip install 'saml-oauth-gateway[otel]'"


class Traced(Protocol):
    """What the request's span reads from, and keeps in, the server's access record
    (``gateway.access.AccessRecord``)."""

    request_id: str
    route: str
    cache: str
    assertion_id: str | None
    reason: str | None
    span: Any
    span_token: Any
    trace_id: str | None


class SpanLike(Protocol):
    """What the request path does with a child span (an OpenTelemetry ``Span`` does it)."""

    def set_attribute(self, key: str, value: str | int, /) -> None: ...


class Tracer(Protocol):
    """The hooks the request path calls: ``Tracing``, or ``UNTRACED`` when it is off."""

    def span(
        self, name: str, attributes: Mapping[str, str] | None = None, *, client: bool = False
    ) -> AbstractContextManager[SpanLike]: ...

    def headers(self) -> Mapping[str, str]: ...


class Tracing:
    """The process's tracer provider and the hooks the request path calls."""

    def __init__(self, config: Config) -> None:
        settings = config.telemetry.tracing
        try:
            from opentelemetry import context, trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ConfigError(
                [f"telemetry.tracing.enabled: the OpenTelemetry packages are missing ({EXTRA})"]
            ) from None
        self._context = context
        self._trace = trace
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self._server_kind = trace.SpanKind.SERVER
        self._client_kind = trace.SpanKind.CLIENT
        self._propagator = TraceContextTextMapPropagator()
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        exporter = OTLPSpanExporter(
            endpoint=settings.endpoint,
            headers={name: value.get_secret_value() for name, value in settings.headers.items()},
            timeout=10,
        )
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("saml-oauth-gateway")

    @classmethod
    def from_config(cls, config: Config) -> Tracing | None:
        return cls(config) if config.telemetry.tracing.enabled else None

    # --- the request's span --------------------------------------------------------------

    def start_request(
        self, request: web.BaseRequest, record: Traced, trusted: Sequence[IPNetwork]
    ) -> None:
        """Open the request's span and make it current for the rest of the handler;
        ``trusted`` is the running config's ``proxy.trusted_proxies``."""
        parent = None
        if "traceparent" in request.headers and peer_is_trusted(request.remote or "", trusted):
            parent = self._propagator.extract(
                {"traceparent": request.headers.getone("traceparent")}
            )
        span = self._tracer.start_span(
            request.method,
            context=parent,
            kind=self._server_kind,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path,
                "client.address": request.remote or "",
                "gateway.request_id": record.request_id,
            },
        )
        record.span = span
        record.span_token = self._context.attach(self._trace.set_span_in_context(span))
        record.trace_id = format(span.get_span_context().trace_id, "032x")

    def finish_request(self, request: web.BaseRequest, record: Traced, status: int) -> None:
        span: Span | None = record.span
        if span is None:
            return
        if record.route != "-":
            span.update_name(f"{request.method} {record.route}")
            span.set_attribute("http.route", record.route)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("gateway.cache", record.cache)
        if record.assertion_id is not None:
            span.set_attribute("gateway.assertion_id", record.assertion_id)
        if record.reason is not None:
            span.set_attribute("gateway.reason", record.reason)
        if status >= 500:
            span.set_status(self._status(self._error, record.reason or str(status)))
        span.end()
        if record.span_token is not None:
            self._context.detach(record.span_token)
        record.span = record.span_token = None

    # --- child spans ---------------------------------------------------------------------

    @contextmanager
    def span(
        self, name: str, attributes: Mapping[str, str] | None = None, *, client: bool = False
    ) -> Iterator[Span]:
        """A child of the current span; a gateway error marks it with its reason word."""
        with self._tracer.start_as_current_span(
            name,
            kind=self._client_kind if client else self._trace.SpanKind.INTERNAL,
            attributes=dict(attributes or {}),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except GatewayError as error:
                span.set_attribute("gateway.reason", error.reason)
                span.set_status(self._status(self._error, error.reason))
                raise

    def headers(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) of the current span, for an outgoing request."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier

    def flush(self, timeout: float = 10) -> bool:
        """Export what is buffered; blocks (call it off the event loop)."""
        return bool(self._provider.force_flush(int(timeout * 1000)))

    def shutdown(self) -> None:
        self._provider.shutdown()


class _Untraced:
    """Tracing off: one reusable span that records nothing, and no headers to send."""

    __slots__ = ()

    def span(
        self, name: str, attributes: Mapping[str, str] | None = None, *, client: bool = False
    ) -> _Untraced:
        return self

    def headers(self) -> Mapping[str, str]:
        return _NO_HEADERS

    def set_attribute(self, key: str, value: str | int, /) -> None:
        pass

    def __enter__(self) -> _Untraced:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


_NO_HEADERS: Mapping[str, str] = {}
UNTRACED: Tracer = _Untraced()
