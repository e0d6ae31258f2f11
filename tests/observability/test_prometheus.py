"""A real Prometheus scraping a real gateway (``workers: 2``, a Redis store) on loopback, with
the rule files loaded: after some accepted and refused requests, every query of the
dashboard and every rule parses, names only metrics and labels the gateway exports, and the
dashboard's queries all return series."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from integration.helpers import (  # the fixtures are re-exported for this folder
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    free_port,
    gateway_yaml,
    idp,
)

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP
from gateway.devkit.redis_server import RedisServer, redis_server_binary
from gateway.devkit.upstream import UpstreamApp

from .helpers import ALERTS, DASHBOARD, RECORDING, tool

__all__ = ["idp"]


JOB = "saml-gateway"  # the job name alerts.yaml selects `up` by
WORKERS = 2
RATE_WINDOW = "30s"  # stands for Grafana's $__rate_interval: 30 scrapes at 1 s
WAIT = 60.0  # the bound of every wait below, in seconds


@dataclass
class Observed:
    prometheus: str
    target: str
    session: aiohttp.ClientSession
    gateway_url: str
    gateway: subprocess.Popen[str]
    auth: FakeAuthorizationServer
    assertion: Callable[[], str]

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.prometheus}/api/v1/{path}", params=params) as r:
            body = await r.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def until(self, expr: str, what: str) -> list[dict[str, Any]]:
        """Poll ``expr`` (bounded) until it returns series."""
        deadline = time.monotonic() + WAIT
        while True:
            result = await self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus never returned {what}: {expr}")
            await asyncio.sleep(0.5)


def start_gateway(folder: Path, config: Path) -> subprocess.Popen[str]:
    log = folder / "gateway.log"
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def observed(
    tmp_path: Path, idp: DemoIdP, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Observed]:
    prometheus_binary = tool("prometheus")
    runtime = tmp_path / "run"  # the supervisor's runtime folder (multiprocess metric files)
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    auth = FakeAuthorizationServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    await auth.start()
    upstream = UpstreamApp()
    upstream_url = await upstream.start()
    path = gateway_yaml(
        tmp_path / "gateway",
        auth.token_url,
        upstream_url,
        idp,
        workers=WORKERS,
        lifecycle={"shutdown_grace": 0, "drain_timeout": 5},
        cache={
            "backend": "redis",
            "redis": {
                "url": redis_server.url,
                "encryption_keys": {"k1": "observability-test-key-0123456789abcdef"},
                "active_key": "k1",
            },
        },
    )
    data = yaml.safe_load(path.read_text())
    port, admin_port = free_port(), free_port()
    data["listen"] = {"host": "127.0.0.1", "port": port}
    data["admin"] = {"host": "127.0.0.1", "port": admin_port}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    gateway = start_gateway(tmp_path, path)

    prometheus_port = free_port()
    target = f"127.0.0.1:{admin_port}"
    prometheus_config = tmp_path / "prometheus.yaml"
    prometheus_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RECORDING), str(ALERTS)],
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    prometheus_log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={prometheus_config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--log.level=warn",
        ],
        stdout=prometheus_log,
        stderr=subprocess.STDOUT,
    )
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    try:
        log = tmp_path / "gateway.log"
        for _ in range(int(WAIT * 10)):  # every worker listening, bounded
            if log.read_text().count("gateway listening") >= WORKERS:
                break
            assert gateway.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the workers did not all start:\n{log.read_text()}")
        url = f"http://127.0.0.1:{prometheus_port}"
        for _ in range(int(WAIT * 10)):
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                async with session.get(f"{url}/-/ready") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("Prometheus did not get ready")

        def assertion() -> str:
            raw = idp.issue(
                "alice@example.test",
                audience=AUDIENCE,
                recipient=auth.token_url,
                now=datetime.now(UTC),
            )
            return base64.b64encode(raw).decode()

        yield Observed(url, target, session, f"http://127.0.0.1:{port}", gateway, auth, assertion)
        # Kept for the failure report of a test that got this far.
        gateway_log = log.read_text()
        assert "Traceback" not in gateway_log, gateway_log
    finally:
        await session.close()
        stop(prometheus)
        prometheus_log.close()
        stop(gateway)  # the supervisor stops its workers
        await upstream.stop()
        await auth.stop()


async def send_traffic(observed: Observed) -> list[int]:
    """Accepted requests (one assertion several times: cache hits), a 503 of the upstream
    passed through, and refusals (no assertion, a broken signature)."""
    session, url = observed.session, observed.gateway_url
    statuses = []
    same = observed.assertion()
    tampered = base64.b64encode(
        base64.b64decode(observed.assertion()).replace(b"alice@", b"mallory@")
    ).decode()
    calls: list[tuple[str, str | None]] = [("/hello", same) for _ in range(5)]
    calls += [("/echo/orders", observed.assertion()) for _ in range(3)]
    calls += [("/status/503", same), ("/hello", None), ("/hello", tampered)]
    async with asyncio.timeout(WAIT):
        for target, value in calls:
            headers = {"X-SAML-Assertion": value} if value is not None else {}
            async with session.get(f"{url}{target}", headers=headers) as r:
                await r.read()
                statuses.append(r.status)
    return statuses


# --- what the queries name -------------------------------------------------------------------

_NAME = re.compile(r"(?<![:\w])(gateway_\w+|up)(?![:\w(])")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def names_in(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def labels_in(expr: str, legend: str = "") -> set[str]:
    labels = {label for group in _GROUPING.findall(expr) for label in re.findall(r"\w+", group)}
    for selector in _SELECTOR.findall(expr):
        labels |= set(_MATCHER.findall(selector))
    return labels | set(_LEGEND.findall(legend))


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) of every query of the dashboard, rows' panels included."""
    data = json.loads(DASHBOARD.read_text())
    panels = list(data["panels"])
    for panel in data["panels"]:
        panels += panel.get("panels", [])
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in panels
        for target in panel.get("targets", [])
    ]


def dashboard_variables() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [v["definition"] for v in data["templating"]["list"] if v["type"] == "query"]


def grafana(expr: str, target: str) -> str:
    """What Grafana sends for the dashboard's variables, with this run's job and target (the
    regex matchers take them as they are: a dot matches itself too)."""
    return (
        expr.replace("$__rate_interval", RATE_WINDOW)
        .replace("$__range", "1m")
        .replace("$job", JOB)
        .replace("$instance", target)
    )


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for path in (RECORDING, ALERTS):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((rule.get("alert") or rule["record"], rule["expr"]))
    return out


def test_the_name_and_label_scan_sees_what_queries_use() -> None:
    """The scan below is what keeps a misspelt label out: check it finds them."""
    expr = (
        'sum by (route, le) (rate(gateway_requests_total{job=~"a",status!="200"}[5m]))'
        " / ignoring (reason) group_left job:gateway_cache_lookups:rate5m"
    )
    assert names_in(expr) == {"gateway_requests_total"}
    assert labels_in(expr, "{{server}} p99") == {"route", "le", "job", "status", "reason", "server"}
    assert len(dashboard_queries()) >= 15


async def test_prometheus_scrapes_the_gateway_and_every_query_works(observed: Observed) -> None:
    # Two waves, scraped in between, so that the counters rise under Prometheus's eyes.
    first = await send_traffic(observed)
    assert first == [200] * 8 + [503, 401, 401]
    await observed.until(f'gateway_requests_total{{job="{JOB}",status="401"}} >= 2', "wave one")
    second = await send_traffic(observed)
    assert second == first
    # A reload (the supervisor passes SIGHUP on to its workers): the reload counter has a
    # series too, so that every panel has something to show.
    observed.gateway.send_signal(signal.SIGHUP)

    # The target is up: the admin listener answers Prometheus.
    targets = (await observed.api("targets"))["activeTargets"]
    assert [(t["labels"]["job"], t["labels"]["instance"], t["health"]) for t in targets] == [
        (JOB, observed.target, "up")
    ]

    # What both workers counted, in one scrape: 16 accepted, 2 upstream 503s, 4 refused.
    totals = await observed.until(
        f'sum by (status) (gateway_requests_total{{job="{JOB}"}}) and on () '
        f'sum(gateway_requests_total{{job="{JOB}"}}) == 22',
        "both waves",
    )
    assert {s["metric"]["status"]: float(s["value"][1]) for s in totals} == {
        "200": 16.0,
        "401": 4.0,
        "503": 2.0,
    }
    rates = await observed.until(
        f'sum by (status) (rate(gateway_requests_total{{job="{JOB}"}}[{RATE_WINDOW}])) > 0',
        "request rates",
    )
    assert {series["metric"]["status"] for series in rates} == {"200", "401", "503"}
    reasons = await observed.query(
        f'sum by (reason) (gateway_validation_failures_total{{job="{JOB}"}})'
    )
    assert {s["metric"]["reason"]: float(s["value"][1]) for s in reasons} == {
        "missing": 2.0,
        "signature": 2.0,
    }
    exchanges = await observed.query(
        f'sum by (server, outcome) (gateway_exchanges_total{{job="{JOB}"}})'
    )
    # One exchange per distinct assertion (four a wave) as the authorization server saw them,
    # give or take a worker that asked before the other's token reached Redis.
    assert [s["metric"] for s in exchanges] == [{"server": "as", "outcome": "ok"}]
    assert float(exchanges[0]["value"][1]) == observed.auth.calls >= 8
    await observed.until(f'gateway_redis_up{{job="{JOB}"}} == 1', "Redis up")
    await observed.until(f'gateway_config_reloads_total{{job="{JOB}",result="ok"}}', "a reload")

    # Every metric name the dashboard and the rules use is one Prometheus holds, and every
    # label they group, match or show by is one of those metrics' labels.
    held = set(await observed.api("label/__name__/values"))
    labels_of: dict[str, set[str]] = {}
    for name in sorted(held):
        series = await observed.api("series", **{"match[]": name})
        labels_of[name] = {label for s in series for label in s if label != "__name__"}

    def check_names_and_labels(where: str, expr: str, legend: str = "") -> None:
        names = names_in(expr)
        assert names, f"{where}: no gateway metric in {expr!r}"
        assert names <= held, f"{where}: {sorted(names - held)} not exported"
        known = set().union(*(labels_of[name] for name in names))
        assert labels_in(expr, legend) <= known, (
            f"{where}: labels {sorted(labels_in(expr, legend) - known)} not on {sorted(names)}"
        )

    for title, expr, legend in dashboard_queries():
        check_names_and_labels(f"panel {title!r}", expr, legend)
    for definition in dashboard_variables():
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
        assert match is not None, definition
        check_names_and_labels(f"variable {definition!r}", match[1] + f"{{{match[2]}=~'.+'}}")
    for name, expr in rule_exprs():
        check_names_and_labels(f"rule {name}", expr)

    # Every dashboard query, as Grafana sends it (a range query), returns series.
    end = time.time()
    for title, expr, _ in dashboard_queries():
        data = await observed.api(
            "query_range",
            query=grafana(expr, observed.target),
            start=str(end - 60),
            end=str(end),
            step="2",
        )
        assert data["result"], f"panel {title!r} shows nothing: {expr}"

    # The rules loaded, and each evaluates without an error (health "ok", not "unknown").
    want = {name for name, _ in rule_exprs()}
    deadline = time.monotonic() + WAIT
    while True:
        groups = (await observed.api("rules"))["groups"]
        health = {
            rule["name"]: (rule["health"], rule.get("lastError", ""))
            for g in groups
            for rule in g["rules"]
        }
        if set(health) == want and all(h == "ok" for h, _ in health.values()):
            break
        assert time.monotonic() < deadline, health
        await asyncio.sleep(0.5)
    # The recorded request rates by status are there, as the alerts will read them.
    recorded = await observed.until(
        f'job_route_status:gateway_requests:rate5m{{job="{JOB}"}}', "recorded rates"
    )
    assert {(s["metric"]["route"], s["metric"]["status"]) for s in recorded} == {
        ("api", "200"),
        ("api", "401"),
        ("api", "503"),
    }
