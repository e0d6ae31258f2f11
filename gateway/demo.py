"""``saml-gateway demo``: the whole flow on loopback, narrated.

It starts an IdP that signs assertions, an RFC 7522 authorization server, an upstream API
and the gateway (configured from a YAML file it writes, the same way an operator would),
then sends three requests and says what happened to each. Every key is made afresh; the
config reads the client secret from a file beside it, as the config examples recommend.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from gateway.app import GatewayServer
from gateway.config import load_config
from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP
from gateway.devkit.loopback import write_loopback_config
from gateway.devkit.upstream import UpstreamApp

ISSUER = "https://idp.demo.test/saml"
AUDIENCE = "https://as.demo.test/oauth2"
SUBJECT = "alice@demo.test"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _mask(token: str) -> str:
    return token[:6] + "…" if len(token) > 6 else "…"


def _tamper(raw: bytes) -> bytes:
    """Change the signed subject: exactly what a signature must catch."""
    return raw.replace(SUBJECT.encode(), b"mallory@demo.test", 1)


async def _metric(session: aiohttp.ClientSession, admin: str, name: str) -> dict[str, float]:
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


async def run_demo(*, port: int = 8080, admin_port: int = 9901, once: bool = False) -> int:
    secret = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="saml-gateway-demo-") as tmp:
        idp = DemoIdP.generate(ISSUER)
        auth = FakeAuthorizationServer(client_id="demo-gateway", client_secret=secret)
        token_url = await auth.start()
        api = UpstreamApp()
        upstream = await api.start()
        config_path = write_loopback_config(
            Path(tmp),
            certificate_pem=idp.certificate_pem,
            issuer=ISSUER,
            token_url=token_url,
            client_id="demo-gateway",
            client_secret=secret,
            audience=AUDIENCE,
            upstream=upstream,
            port=port,
            admin_port=admin_port,
            server={"scope": "api.read"},
            route={"name": "demo-api"},
        )
        server = GatewayServer(load_config(config_path), config_path=config_path)
        try:
            await server.start()
        except OSError as exc:
            print(f"demo: cannot listen on 127.0.0.1:{port}: {exc.strerror}", file=sys.stderr)
            print("demo: set DEMO_PORT / DEMO_ADMIN_PORT to free ports", file=sys.stderr)
            await server.close()
            await api.stop()
            await auth.stop()
            return 1
        gateway = f"http://127.0.0.1:{server.port}"
        admin = f"http://127.0.0.1:{server.admin_port}"
        try:
            ok = await _walk(gateway, admin, idp, auth, token_url)
            if not once:
                _show_curl(gateway, admin, idp, token_url)
                await _until_stopped()
            return 0 if ok else 1
        finally:
            await server.close()
            await api.stop()
            await auth.stop()


async def _walk(
    gateway: str, admin: str, idp: DemoIdP, auth: FakeAuthorizationServer, token_url: str
) -> bool:
    now = datetime.now(UTC)
    raw = idp.issue(SUBJECT, audience=AUDIENCE, recipient=token_url, now=now, lifetime=3600)
    header = base64.b64encode(raw).decode()
    _say("SAML → OAuth gateway demo (everything on 127.0.0.1)")
    _say(f"  identity provider     {ISSUER} (RSA-2048 key made just now)")
    _say(f"  authorization server  {token_url}")
    _say(f"  gateway               {gateway}   admin {admin}")
    _say()
    results: list[bool] = []
    async with aiohttp.ClientSession() as session:
        _say(f"1. GET /echo/orders with a fresh signed assertion for {SUBJECT} ({len(raw)} bytes)")
        async with session.get(f"{gateway}/echo/orders", headers={"X-SAML-Assertion": header}) as r:
            body = await r.json()
            seen = dict(body.get("headers", [])).get("Authorization", "")
            _say(f"   → {r.status}; the API saw 'Authorization: Bearer {_mask(seen[7:])}'")
            _say(f"   → the gateway exchanged the assertion: {auth.calls} call(s) to the token URL")
            results.append(r.status == 200 and auth.calls == 1)
        _say("2. The same request again")
        async with session.get(f"{gateway}/echo/orders", headers={"X-SAML-Assertion": header}) as r:
            await r.read()
            _say(f"   → {r.status}; served from the token cache, still {auth.calls} exchange(s)")
            results.append(r.status == 200 and auth.calls == 1)
        _say("3. The assertion with its subject changed to mallory@demo.test after signing")
        tampered = base64.b64encode(_tamper(raw)).decode()
        async with session.get(
            f"{gateway}/echo/orders", headers={"X-SAML-Assertion": tampered}
        ) as r:
            answer = await r.json()
            failures = await _metric(session, admin, "gateway_validation_failures_total")
            reasons = ", ".join(k.split('"')[1] for k, v in failures.items() if v and '"' in k)
            _say(f"   → {r.status} {answer.get('error_description')!r}")
            _say(f"   → reason (kept for logs and /metrics, never told to the client): {reasons}")
            results.append(r.status == 401)
    _say()
    passed = all(results)
    _say(
        f"Summary: {sum(results)}/{len(results)} steps behaved as expected; "
        f"{auth.calls} exchange(s) for 2 good requests."
    )
    return passed


async def _until_stopped() -> None:
    """Wait for Ctrl-C or SIGTERM, then let the caller shut everything down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    _say("Stopping.")


def _show_curl(gateway: str, admin: str, idp: DemoIdP, token_url: str) -> None:
    fresh = idp.issue(
        SUBJECT, audience=AUDIENCE, recipient=token_url, now=datetime.now(UTC), lifetime=3600
    )
    _say()
    _say("Try it yourself (this demo assertion is valid for one hour):")
    _say(f"  ASSERTION='{base64.b64encode(fresh).decode()}'")
    _say(f'  curl -i -H "X-SAML-Assertion: $ASSERTION" {gateway}/hello')
    _say(f'  curl -i -H "Authorization: SAML $ASSERTION" {gateway}/echo/anything')
    _say(f"  curl -i {gateway}/hello                      # no assertion: 401")
    _say(f"  curl -s {admin}/metrics | grep ^gateway_")
    _say("Press Ctrl-C to stop.")
