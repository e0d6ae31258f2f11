"""Prometheus metrics, one registry per process (never the global one, so tests can run
several gateways in one process). Cache counters are read at scrape time, so the hot path
pays nothing for them.

``workers: N``: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers, so
prometheus-client keeps every value in per-process files there, and whichever worker answers
a scrape reports the whole host. Counters and histograms are sums over every worker of the
run (a replaced worker's counts stay in). Gauges: ``gateway_cache_size`` and
``gateway_singleflight_waiters`` are sums over the live workers (each worker's LRU holds its
own copy of a token, so a token two workers hold counts twice); ``gateway_redis_up`` is the
minimum over the live workers (1 only while every worker's Redis answers). The cache's own
counters reach the files once a second, and at once for the worker answering the scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SYNC_SECONDS = 1.0  # how often a worker copies its cache counters to the shared files


def multiprocess() -> bool:
    """Whether prometheus-client keeps values in shared files: it decided when it was first
    imported (``PROMETHEUS_MULTIPROC_DIR`` set then), so ask it rather than the environment."""
    return values.ValueClass is not values.MutexValue


class CacheStats(Protocol):
    """What the metrics read of the token cache at scrape time (``TokenCache`` has it)."""

    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def replays(self) -> int: ...
    @property
    def negative_hits(self) -> int: ...
    @property
    def waiters(self) -> int:
        """Callers waiting on an exchange another caller started."""
        ...

    def __len__(self) -> int:
        """Tokens held in memory."""
        ...


class _CacheCollector(Collector):
    def __init__(self, cache: Callable[[], CacheStats]) -> None:
        self._cache = cache

    def collect(self) -> Iterable[Metric]:
        cache = self._cache()
        for name, doc, value in (
            ("gateway_cache_hits", "Token cache fast-path hits", cache.hits),
            ("gateway_cache_misses", "Token cache misses", cache.misses),
            ("gateway_cache_evictions", "Tokens evicted by the LRU bound", cache.evictions),
            (
                "gateway_cache_replays",
                "Assertion IDs reused by a different assertion",
                cache.replays,
            ),
            (
                "gateway_cache_negative_hits",
                "Requests refused by the negative cache",
                cache.negative_hits,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "gateway_cache_size", "Tokens in the in-memory cache", value=len(cache)
        )
        yield GaugeMetricFamily(
            "gateway_singleflight_waiters",
            "Requests waiting on an exchange another request started",
            value=cache.waiters,
        )


class _CacheFiles:
    """Multiprocess mode: copies what ``_CacheCollector`` reads into prometheus-client's
    files (counters by their increase since the last copy, gauges as they are)."""

    def __init__(self, source: _CacheCollector) -> None:
        self._source = source
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._copied: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def sync(self) -> None:
        for family in self._source.collect():
            for sample in family.samples:
                names = sorted(sample.labels)
                values = [sample.labels[name] for name in names]
                if family.type == "counter" and sample.name.endswith("_total"):
                    counter = self._counters.get(family.name)
                    if counter is None:
                        counter = Counter(family.name, family.documentation, names, registry=None)
                        self._counters[family.name] = counter
                    key = (family.name, tuple(sorted(sample.labels.items())))
                    increase = sample.value - self._copied.get(key, 0.0)
                    self._copied[key] = sample.value
                    if increase > 0:  # a smaller value is a new cache: nothing to add
                        (counter.labels(*values) if names else counter).inc(increase)
                elif family.type == "gauge":
                    gauge = self._gauges.get(family.name)
                    if gauge is None:
                        gauge = Gauge(
                            family.name,
                            family.documentation,
                            names,
                            registry=None,
                            multiprocess_mode="livesum",
                        )
                        self._gauges[family.name] = gauge
                    (gauge.labels(*values) if names else gauge).set(sample.value)

    def every(self, seconds: float) -> None:
        """Copy now and then every ``seconds`` on the running loop (none: at scrapes only)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def tick() -> None:
            self.sync()
            loop.call_later(seconds, tick)

        loop.call_later(seconds, tick)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests by route and status", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Time to answer a request, streamed body included",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "gateway_upstream_duration_seconds",
            "Time until the upstream sent its response headers",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.exchanges = Counter(
            "gateway_exchanges",
            "Token exchanges by authorization server and outcome",
            ["server", "outcome"],
            registry=r,
        )
        self.exchange_seconds = Histogram(
            "gateway_exchange_duration_seconds",
            "Token exchange duration, retries included",
            ["server"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.validation_failures = Counter(
            "gateway_validation_failures", "Assertions refused, by reason", ["reason"], registry=r
        )
        # Registered by the first report of a Redis store: without one there is no such metric.
        self.redis_up: Gauge | None = None
        self._request_counters: dict[tuple[str, int], Counter] = {}
        self._request_histograms: dict[str, Histogram] = {}
        self._upstream_histograms: dict[str, Histogram] = {}
        self.reloads = Counter(
            "gateway_config_reloads", "Config reloads by result", ["result"], registry=r
        )
        self._cache_files: _CacheFiles | None = None

    # Label lookups cost a few µs each; the hot path keeps the children it has used.
    def observe_request(self, route: str, status: int, seconds: float) -> None:
        counter = self._request_counters.get((route, status))
        if counter is None:
            counter = self.requests.labels(route, str(status))
            self._request_counters[(route, status)] = counter
        counter.inc()
        histogram = self._request_histograms.get(route)
        if histogram is None:
            histogram = self._request_histograms[route] = self.request_seconds.labels(route)
        histogram.observe(seconds)

    def observe_upstream(self, route: str, seconds: float) -> None:
        histogram = self._upstream_histograms.get(route)
        if histogram is None:
            histogram = self._upstream_histograms[route] = self.upstream_seconds.labels(route)
        histogram.observe(seconds)

    def watch_cache(self, cache: Callable[[], CacheStats]) -> None:
        collector = _CacheCollector(cache)
        if multiprocess():
            self._cache_files = _CacheFiles(collector)
            self._cache_files.every(_SYNC_SECONDS)
        else:
            self.registry.register(collector)

    def observe_exchange(self, server: str, outcome: str, seconds: float) -> None:
        self.exchanges.labels(server, outcome).inc()
        self.exchange_seconds.labels(server).observe(seconds)

    def observe_redis(self, up: bool) -> None:
        if self.redis_up is None:
            self.redis_up = Gauge(
                "gateway_redis_up",
                "1 while the shared Redis store answers",
                registry=self.registry,
                multiprocess_mode="livemin",
            )
        self.redis_up.set(1 if up else 0)

    def render(self) -> bytes:
        if not multiprocess():
            return generate_latest(self.registry)
        if self._cache_files is not None:
            self._cache_files.sync()
        host = CollectorRegistry()  # a fresh one per scrape, as prometheus-client advises
        MultiProcessCollector(host)  # type: ignore[no-untyped-call]  # unannotated upstream
        return generate_latest(host)
