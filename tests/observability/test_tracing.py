"""Tracing on, against a real OTLP/HTTP receiver on loopback (an aiohttp server decoding the
protobuf export as a collector does): the spans, their parents, the ``traceparent`` the
authorization server and the upstream received, and what no attribute may hold."""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from integration.helpers import (  # the fixtures are re-exported for this folder
    CLIENT_SECRET,
    Parts,
    Stack,
    echoed_headers,
    gateway_yaml,
    idp,
    parts,
    stack,
    start_stack,
)

from gateway.devkit.idp import DemoIdP

__all__ = ["idp", "parts", "stack"]

pb = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="the otel extra is not installed (make venv installs it with the test extra)",
)

COLLECTOR_KEY = "collector-api-key-5d41402abc4b2a76"
SERVICE = "gateway-under-test"


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: every span it was sent, and the headers it came with."""

    url: str = ""
    spans: list[Any] = field(default_factory=list)
    resources: list[dict[str, str]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        export = pb.ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.headers.append(dict(request.headers))
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(span)
                    self.resources.append(resource)
        return web.Response(
            body=pb.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}/v1/traces"
    yield found
    await runner.cleanup()


async def traced_stack(
    tmp_path: Path, idp: DemoIdP, parts: Parts, receiver: Receiver, trusted: list[str]
) -> Stack:
    return await start_stack(
        tmp_path,
        idp,
        parts,
        telemetry={
            "tracing": {
                "enabled": True,
                "endpoint": receiver.url,
                "service_name": SERVICE,
                "sample_ratio": 1.0,
                "headers": {"x-api-key": COLLECTOR_KEY},
            }
        },
        proxy={"trusted_proxies": trusted},
    )


async def exported(stack: Stack, receiver: Receiver, count: int) -> list[Any]:
    """Flush the gateway's spans (off the loop: the receiver runs on it) and wait for them."""
    tracing = stack.server.tracing
    assert tracing is not None
    deadline = time.monotonic() + 20
    while len(receiver.spans) < count:
        assert await asyncio.to_thread(tracing.flush, 5)
        assert time.monotonic() < deadline, [s.name for s in receiver.spans]
        await asyncio.sleep(0.05)
    return receiver.spans


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        out[attribute.key] = getattr(value, value.WhichOneof("value"))
    return out


def every_text(spans: list[Any], resources: list[dict[str, str]]) -> str:
    """Names, attribute values, event names and attributes, status messages, resources."""
    parts = []
    for span in spans:
        parts += [span.name, span.status.message, *map(str, attributes(span).values())]
        for event in span.events:
            parts += [event.name, *map(str, attributes(event).values())]
    for resource in resources:
        parts += resource.values()
    return "\n".join(parts)


def traceparent(trace_id: str, parent_id: str) -> str:
    return f"00-{trace_id}-{parent_id}-01"


def parsed(value: str) -> tuple[str, str]:
    version, trace_id, parent_id, _flags = value.split("-")
    assert version == "00"
    return trace_id, parent_id


async def test_spans_of_a_request_continue_a_trusted_proxys_trace(
    tmp_path: Path,
    idp: DemoIdP,
    parts: Parts,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    stack = await traced_stack(tmp_path, idp, parts, receiver, ["127.0.0.1/32"])
    try:
        inbound_trace, inbound_parent = secrets.token_hex(16), secrets.token_hex(8)
        stack.auth.fail_next = 1  # a 500, then a token: two exchange attempts
        headers = {
            **stack.assertion(),
            "traceparent": traceparent(inbound_trace, inbound_parent),
            "tracestate": "vendor=client",
        }
        async with stack.session.get(f"{stack.url}/echo/orders", headers=headers) as r:
            assert r.status == 200
            seen = echoed_headers(await r.json())
        assertion_text = headers["X-SAML-Assertion"]
        spans = await exported(stack, receiver, 5)
    finally:
        await stack.session.close()
        await stack.server.close()

    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert sorted(by_name) == ["GET api", "token exchange", "upstream", "validate assertion"]
    (request,) = by_name["GET api"]
    # The request continues the proxy's trace; every other span is its child.
    assert request.trace_id.hex() == inbound_trace
    assert request.parent_span_id.hex() == inbound_parent
    assert {span.trace_id.hex() for span in spans} == {inbound_trace}
    for name in ("validate assertion", "token exchange", "upstream"):
        assert {s.parent_span_id for s in by_name[name]} == {request.span_id}, name
    assert attributes(request) == {
        "http.request.method": "GET",
        "url.path": "/echo/orders",
        "client.address": "127.0.0.1",
        "gateway.request_id": r.headers["X-Request-ID"],
        "http.route": "api",
        "http.response.status_code": 200,
        "gateway.cache": "miss",
        "gateway.assertion_id": attributes(by_name["validate assertion"][0])[
            "gateway.assertion_id"
        ],
    }
    first, second = sorted(by_name["token exchange"], key=lambda s: s.start_time_unix_nano)
    assert attributes(first)["gateway.exchange.outcome"] == "error"
    assert attributes(first)["http.response.status_code"] == 500
    assert attributes(second)["gateway.exchange.outcome"] == "ok"
    assert attributes(second)["gateway.authorization_server"] == "as"
    assert attributes(by_name["upstream"][0])["http.response.status_code"] == 200

    # What the other side received: the authorization server's last request came from the
    # second attempt's span, the upstream's from the upstream span, both of this trace; the
    # client's tracestate stayed behind.
    assert parsed(stack.auth.last_headers["traceparent"]) == (
        inbound_trace,
        second.span_id.hex(),
    )
    assert parsed(seen["traceparent"]) == (inbound_trace, by_name["upstream"][0].span_id.hex())
    assert "tracestate" not in seen

    # The collector got its header and the service name; the access line names the trace.
    assert {h.get("x-api-key") for h in receiver.headers} == {COLLECTOR_KEY}
    assert {r["service.name"] for r in receiver.resources} == {SERVICE}
    access = [rec.fields for rec in caplog.records if rec.name == "gateway.access"]  # type: ignore[attr-defined]
    assert [line["trace_id"] for line in access] == [inbound_trace]

    # Nothing secret anywhere in what was exported.
    text = every_text(spans, receiver.resources)
    raw = base64.b64decode(assertion_text).decode()
    for secret in (
        assertion_text,
        assertion_text[:40],
        raw[:60],
        "alice@example.test",  # the NameID: content of the assertion
        CLIENT_SECRET,
        COLLECTOR_KEY,
        "Bearer",
        *stack.auth.issued,
    ):
        assert secret not in text


async def test_an_untrusted_peers_traceparent_starts_a_new_trace(
    tmp_path: Path, idp: DemoIdP, parts: Parts, receiver: Receiver
) -> None:
    stack = await traced_stack(tmp_path, idp, parts, receiver, ["10.0.0.0/8"])
    try:
        inbound_trace, inbound_parent = secrets.token_hex(16), secrets.token_hex(8)
        headers = {**stack.assertion(), "traceparent": traceparent(inbound_trace, inbound_parent)}
        async with stack.session.get(f"{stack.url}/echo/x", headers=headers) as r:
            assert r.status == 200
            seen = echoed_headers(await r.json())
        raw = stack.raw_assertion().replace(b"alice@example.test", b"mallory@example.test")
        tampered = {"X-SAML-Assertion": base64.b64encode(raw).decode()}
        async with stack.session.get(f"{stack.url}/hello", headers=tampered) as r:
            assert r.status == 401
        spans = list(await exported(stack, receiver, 6))
        # A reload that trusts this peer: its traceparent is continued from then on.
        data = yaml.safe_load(stack.config_path.read_text())
        data["proxy"]["trusted_proxies"] = ["127.0.0.1/32"]
        stack.config_path.write_text(yaml.safe_dump(data))
        assert await stack.server.reload()
        headers = {**stack.assertion(), "traceparent": traceparent(inbound_trace, inbound_parent)}
        async with stack.session.get(f"{stack.url}/echo/x", headers=headers) as r:
            assert r.status == 200
        after = (await exported(stack, receiver, 10))[6:]
    finally:
        await stack.session.close()
        await stack.server.close()

    requests = [s for s in spans if s.name == "GET api"]
    assert len(requests) == 2
    accepted, refused = sorted(requests, key=lambda s: s.start_time_unix_nano)
    assert accepted.trace_id.hex() != inbound_trace
    assert accepted.parent_span_id == b""  # a root: the client's parent is not ours
    upstream = next(s for s in spans if s.name == "upstream")
    assert parsed(seen["traceparent"]) == (accepted.trace_id.hex(), upstream.span_id.hex())
    # The refusal: its reason on the request span and on the validation span, no exchange.
    assert attributes(refused)["gateway.reason"] == "signature"
    assert attributes(refused)["http.response.status_code"] == 401
    validation = [
        s for s in spans if s.name == "validate assertion" and s.trace_id == refused.trace_id
    ]
    assert [attributes(s)["gateway.reason"] for s in validation] == ["signature"]
    assert not [s for s in spans if s.name == "token exchange" and s.trace_id == refused.trace_id]
    assert "mallory@example.test" not in every_text(spans, receiver.resources)
    (continued,) = [s for s in after if s.name == "GET api"]
    assert continued.trace_id.hex() == inbound_trace
    assert continued.parent_span_id.hex() == inbound_parent


async def test_tracing_off_leaves_the_clients_traceparent_alone(stack: Stack) -> None:
    assert stack.server.tracing is None
    value = traceparent(secrets.token_hex(16), secrets.token_hex(8))
    headers = {**stack.assertion(), "traceparent": value}
    async with stack.session.get(f"{stack.url}/echo/x", headers=headers) as r:
        assert r.status == 200
        seen = echoed_headers(await r.json())
    assert seen["traceparent"] == value


def test_tracing_without_the_extra_is_a_startup_error_naming_the_key(
    tmp_path: Path, idp: DemoIdP
) -> None:
    """``saml-gateway run`` as on a machine without ``[otel]``: the imports fail (the module
    is blocked), and the gateway refuses to start, naming the key and the extra."""
    path = gateway_yaml(
        tmp_path,
        "http://127.0.0.1:9/token",
        "http://127.0.0.1:9",
        idp,
        telemetry={"tracing": {"enabled": True}},
    )
    code = (
        "import sys; sys.modules['opentelemetry'] = None; "
        "from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "telemetry.tracing.enabled" in output
    assert "saml-oauth-gateway[otel]" in output
    assert "Traceback" not in output
