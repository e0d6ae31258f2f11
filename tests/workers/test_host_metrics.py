"""What one scrape shows for a whole host: worker processes write prometheus-client's
multiprocess files, any process renders them. Counters add up over every worker that ever
ran; the gauges use the aggregates the README names (live sum, live minimum)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from .helpers import metric

# One "worker": a token cache with the given counts and size, a Redis store up or down, and
# some requests; it writes its values and exits (its files stay, as a dead worker's do).
_WORKER = """
import sys
from gateway.metrics import Metrics

hits, size, redis_up, requests = (int(v) for v in sys.argv[1:5])


class Cache:  # what Metrics reads of a token cache (gateway.metrics.CacheStats)
    misses = evictions = replays = negative_hits = waiters = 0

    def __init__(self) -> None:
        self.hits = hits

    def __len__(self) -> int:
        return size


cache = Cache()
metrics = Metrics()
metrics.watch_cache(lambda: cache)
metrics.observe_redis(bool(redis_up))
for _ in range(requests):
    metrics.observe_request("api", 200, 0.01)
metrics.render()  # the answering worker copies its cache counters first
"""
_SCRAPE = """
import sys
from gateway.metrics import Metrics

sys.stdout.write(Metrics().render().decode())
"""


def run(folder: Path, code: str, *args: int) -> tuple[int, str]:
    """Run ``code`` as a process of the host; its pid and what it printed."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    with subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    return process.pid, out


def test_one_scrape_sums_counters_and_aggregates_gauges_over_the_workers(tmp_path: Path) -> None:
    run(tmp_path, _WORKER, 3, 10, 1, 5)  # hits, cache size, Redis up, requests
    second, _ = run(tmp_path, _WORKER, 4, 7, 0, 6)
    _, page = run(tmp_path, _SCRAPE)
    assert metric(page, "gateway_requests_total", route="api", status="200") == 11
    assert metric(page, "gateway_cache_hits_total") == 7
    assert metric(page, "gateway_cache_size") == 17  # summed over the live workers
    assert metric(page, "gateway_redis_up") == 0  # the minimum: one worker's Redis is down
    # The supervisor marks a worker dead when it exits: its gauges leave, its counts stay.
    mark_process_dead(second, str(tmp_path))
    _, page = run(tmp_path, _SCRAPE)
    assert metric(page, "gateway_requests_total", route="api", status="200") == 11
    assert metric(page, "gateway_cache_hits_total") == 7
    assert metric(page, "gateway_cache_size") == 10
    assert metric(page, "gateway_redis_up") == 1
