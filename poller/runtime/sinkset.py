"""The running sinks: each opened as an async context manager with its delivery worker in a task of
its own. A worker that crashes reports it through `on_crash` (the daemon then stops with exit 1).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack

import structlog

from poller.config.sinks import SinkConfig
from poller.delivery.worker import DeliveryWorker
from poller.domain.schedule import Rand
from poller.metrics import Metrics
from poller.sinks.base import Sink
from poller.sinks.registry import sink_kind
from poller.store.base import Outbox

log = structlog.get_logger("poller.sinks")


class SinkSet:
    def __init__(
        self,
        store: Outbox,
        metrics: Metrics,
        *,
        on_crash: Callable[[BaseException], None],
        clock: Callable[[], float] = time.time,
        rand: Rand = random.random,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.on_crash = on_crash
        self.clock = clock
        self.rand = rand
        self.configs: dict[str, SinkConfig] = {}
        self.workers: dict[str, DeliveryWorker] = {}
        self._stacks: dict[str, AsyncExitStack] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.started = False

    def wake(self) -> None:
        for worker in self.workers.values():
            worker.wake()

    async def open(self, name: str, config: SinkConfig, sink: Sink) -> None:
        stack = AsyncExitStack()
        await stack.enter_async_context(sink)
        worker = DeliveryWorker(self.store, sink, self.metrics, clock=self.clock, rand=self.rand)
        self.workers[name] = worker
        self.configs[name] = config
        self._stacks[name] = stack
        self.metrics.sink_up.labels(name).set(1)
        if self.started:
            self._start(name, worker)

    def start(self) -> None:
        self.started = True
        for name, worker in self.workers.items():
            self._start(name, worker)

    def _start(self, name: str, worker: DeliveryWorker) -> None:
        task = asyncio.create_task(worker.run(), name=f"poller.delivery[{name}]")
        task.add_done_callback(self._ended)
        self._tasks[name] = task

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A delivery worker must only end when told to: a crash stops the daemon (exit 1, systemd restarts)."""
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("a delivery worker crashed; shutting down", task=task.get_name(), exc_info=error)
            self.on_crash(error)

    async def close(self, name: str, deadline: float) -> None:
        """Stop one sink: in-flight sends get the deadline; its rows stay in the outbox."""
        worker = self.workers.pop(name, None)
        if worker is not None:
            await worker.stop(deadline)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stack = self._stacks.pop(name, None)
        if stack is not None:
            await stack.aclose()
        self.configs.pop(name, None)

    async def close_all(self, deadline: float) -> None:
        await asyncio.gather(*(self.close(name, deadline) for name in list(self.workers)), return_exceptions=True)

    def health(self, name: str) -> str:
        worker = self.workers[name]
        return "disabled" if worker.disabled else worker.sink.health()

    def status_parts(self) -> list[str]:
        """For the status line: each sink that is not ok, and each connection-holding sink."""
        parts = []
        for name, config in self.configs.items():
            state = self.health(name)
            if state != "ok" or sink_kind(config.kind).connection:
                parts.append(f"{name} {state}")
        return parts

    def views(self, stats: Mapping[str, Mapping[str, object]], now: float) -> dict[str, dict[str, object]]:
        views: dict[str, dict[str, object]] = {}
        for name, worker in self.workers.items():
            entry = stats.get(name, {})
            oldest = entry.get("oldest_pending")
            views[name] = {
                "kind": self.configs[name].kind,
                "health": self.health(name),
                "pending": entry.get("pending", 0),
                "dead": entry.get("dead", 0),
                "oldest_pending_age": round(now - oldest, 1) if isinstance(oldest, int | float) else None,
                "in_flight": worker.in_flight,
                "delivered": worker.delivered,
                "last_error": worker.last_error,
            }
        return views
