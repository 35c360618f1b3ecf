"""Drive a `Daemon` in this event loop: wait for its first refresh, then force full refreshes on demand.

A full refresh is what the source's `SourceRunner` loop does when every tracked batch is due at once:
set every `next_due` to 0 and wake the runner; it refreshes them all in one call (`Refresher.refresh(due)`).
The driver wraps that method, for as long as the daemon runs, to learn when the call returned, so
nothing polls the tracked set while it is measured. One driver per process at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bench.common import KEY, KEY_ENV, SOURCE
from poller.config import Config, parse_config
from poller.polling.refresh import Refresher
from poller.polling.runner import SourceRunner
from poller.runtime.daemon import Daemon
from poller.store import ACTIVE, TrackedBatch, open_store

#: Seconds a refresh may take before the benchmark gives up.
REFRESH_TIMEOUT = 300.0


@dataclass(frozen=True)
class Refresh:
    """One call of `Refresher.refresh`: how many batches were due, what it cost, and what was left over."""

    due: int
    requests: dict[str, int]
    cpu: float
    wall: float
    #: Active batches still due after the refresh (a failed request leaves its batches due).
    missed: int

    @property
    def total(self) -> int:
        return sum(self.requests.values())


async def pre_track(state: Path, ids: list[str], source: str = SOURCE) -> None:
    """Track `ids` in the state file before the daemon starts (as `batch-poller track` does)."""
    async with open_store(state) as store:
        await store.track(source, ids, "bench", time.time())


def pre_track_sync(state: Path, ids: list[str], source: str = SOURCE) -> None:
    """`pre_track` for code outside an event loop (before a daemon process is spawned)."""
    asyncio.run(pre_track(state, ids, source))


class DaemonDriver:
    """An in-process daemon whose refreshes are observed; use as an async context manager."""

    def __init__(self, raw_config: dict[str, Any]) -> None:
        self.config: Config = parse_config(raw_config)
        self.daemon = Daemon(self.config, environ={KEY_ENV: KEY})
        self._done = asyncio.Event()
        self._last: tuple[int, float, float] | None = None
        self._task: asyncio.Task[int] | None = None
        self._restore: Callable[[], None] | None = None

    @property
    def runner(self) -> SourceRunner:
        """The runner of the config's only source."""
        return self.daemon.runner(None)

    def _observe(self) -> Callable[[], None]:
        """Wrap the refresh entry point, `Refresher.refresh`, for as long as the daemon runs."""
        owner, name = Refresher, "refresh"
        original: Callable[[Any, list[TrackedBatch]], Awaitable[None]] = getattr(owner, name)
        driver = self

        async def observed(this: Any, due: list[TrackedBatch]) -> None:
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                await original(this, due)
            finally:
                driver._last = (len(due), time.process_time() - cpu, time.perf_counter() - wall)
                driver._done.set()

        setattr(owner, name, observed)
        return lambda: setattr(owner, name, original)

    async def __aenter__(self) -> Self:
        # Patched before the daemon starts: its runner may refresh before `ready` wakes us.
        self._restore = self._observe()
        self._task = asyncio.create_task(self.daemon.run(), name="bench.daemon")
        ready = asyncio.create_task(self.daemon.ready.wait(), name="bench.ready")
        await asyncio.wait([ready, self._task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            return self
        ready.cancel()
        ended = self._task.done()
        await self.__aexit__(None, None, None)  # re-raises whatever the daemon raised
        raise RuntimeError("the daemon ended before it was ready" if ended else "the daemon was not ready within 60 s")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.daemon.stop()
        try:
            if self._task is not None:
                await asyncio.wait_for(self._task, 120)
        finally:
            if self._restore is not None:
                self._restore()

    def requests(self) -> Counter[str]:
        """Requests the source's provider sent since the daemon started, by kind (list, retrieve)."""
        provider: Any = self.runner.ctx.provider
        return Counter() if provider is None else Counter(provider.requests)

    def _active(self) -> list[TrackedBatch]:
        return self.runner.tracker.active()

    async def first_refresh(self) -> Refresh:
        """The refresh of first sight (the runner's first turn finds every tracked batch due).

        Its CPU is the `refresh` call's own; requests are counted since the daemon started.
        """
        await asyncio.wait_for(self._done.wait(), REFRESH_TIMEOUT)
        assert self._last is not None
        due, cpu, wall = self._last
        missed = sum(1 for b in self._active() if b.next_due <= 0)
        return Refresh(due, dict(self.requests()), cpu, wall, missed)

    async def full_refresh(self) -> Refresh:
        """Make every active batch due, wake the runner and wait for the one `refresh` call that follows.

        CPU and wall time are the whole process's from the wake to the end of that call.
        """
        before = self.requests()
        active = self._active()
        for batch in active:
            batch.next_due = 0.0
        self._done.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        # `SourceRunner.wake` only ends the runner's idle wait; it re-reads nothing from the store.
        self.runner.wake()
        await asyncio.wait_for(self._done.wait(), REFRESH_TIMEOUT)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert self._last is not None
        after = self.requests()
        after.subtract(before)
        missed = sum(1 for b in active if b.state == ACTIVE and b.next_due <= 0)
        return Refresh(self._last[0], {k: v for k, v in after.items() if v}, cpu, wall, missed)
