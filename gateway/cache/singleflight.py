"""Single-flight: concurrent callers with the same key share one running task.

Rules this module owns:
- The first caller starts the work as a task; later callers with the same key await that
  same task. Every caller awaits it through ``asyncio.shield``, so a caller that goes away
  (its request cancelled) never cancels the work the others are waiting for.
- The task is forgotten as soon as it finishes, so a failure is never served to a caller
  that arrives later: errors are not cached here.
- The registry holds a strong reference to each running task until it is done (the event
  loop keeps only weak ones), and retrieves its exception, so no task is lost to the
  garbage collector and none logs "exception was never retrieved" when every caller left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Flight(Generic[T]):
    task: asyncio.Task[T]
    tag: bytes  # what the work is for (the assertion digest): a caller can check it first


class SingleFlight(Generic[K, T]):
    def __init__(self) -> None:
        self._flights: dict[K, _Flight[T]] = {}
        self.waiters = 0  # callers currently awaiting a task another caller started

    def __len__(self) -> int:
        return len(self._flights)

    def tag(self, key: K) -> bytes | None:
        """The tag of the work running for ``key``, or None when nothing runs."""
        flight = self._flights.get(key)
        return flight.tag if flight is not None else None

    async def run(self, key: K, tag: bytes, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Start ``work()`` for ``key`` unless it already runs; await its result either way."""
        flight = self._flights.get(key)
        leader = flight is None
        if flight is None:
            task = asyncio.get_running_loop().create_task(work())
            flight = _Flight(task, tag)
            self._flights[key] = flight
            task.add_done_callback(lambda done: self._finished(key, done))
        else:
            self.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            if not leader:
                self.waiters -= 1

    def _finished(self, key: K, task: asyncio.Task[T]) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight.task is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: the callers may all have gone

    async def close(self) -> None:
        """Cancel whatever still runs and wait for it to finish (shutdown only)."""
        tasks = [flight.task for flight in self._flights.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
