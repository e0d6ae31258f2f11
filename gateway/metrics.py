"""Prometheus metrics, one registry per process (never the global one, so tests can run
several gateways in one process). Cache counters are read at scrape time, so the hot path
pays nothing for them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.cache import TokenCache

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _CacheCollector(Collector):
    def __init__(self, cache: Callable[[], TokenCache]) -> None:
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

    def watch_cache(self, cache: Callable[[], TokenCache]) -> None:
        self.registry.register(_CacheCollector(cache))

    def observe_exchange(self, server: str, outcome: str, seconds: float) -> None:
        self.exchanges.labels(server, outcome).inc()
        self.exchange_seconds.labels(server).observe(seconds)

    def observe_redis(self, up: bool) -> None:
        if self.redis_up is None:
            self.redis_up = Gauge(
                "gateway_redis_up", "1 while the shared Redis store answers", registry=self.registry
            )
        self.redis_up.set(1 if up else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
