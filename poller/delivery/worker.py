"""Draining one sink's outbox: send due queue heads, record each outcome.

Promises: per batch, rows go out in `sequence` order and the next waits until the previous one was
delivered or dead-lettered; different batches proceed concurrently up to the sink's `max_in_flight`.
A row is marked delivered only after the sink acknowledged it. Retries follow the sink's schedule
(`poller.delivery.retry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

import structlog

from poller.delivery.retry import retry_delay
from poller.domain.events import decode
from poller.domain.schedule import Rand
from poller.errors import DeliveryError
from poller.metrics import Metrics
from poller.sinks.base import Sink
from poller.store.base import Outbox, OutboxRow

log = structlog.get_logger("poller.delivery")

#: Even without a wake-up, a worker looks at its queue this often (a safety net for missed wakes).
IDLE_CHECK = 5.0


class DeliveryWorker:
    """Drains one sink's outbox rows. `run` loops until `stop`; `wake` says new rows arrived."""

    def __init__(
        self,
        store: Outbox,
        sink: Sink,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rand: Rand = random.random,
    ) -> None:
        self.store = store
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self.rand = rand
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight: dict[tuple[str, str], tuple[OutboxRow, asyncio.Task[float | None]]] = {}
        self.disabled = False
        self._failing = False
        self.delivered = 0
        self.last_error: str | None = None

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        name = self.sink.name
        while not self._stopping and not self.disabled:
            self._wake.clear()
            await self._reap()
            free = self.sink.max_in_flight - len(self._in_flight)
            if free > 0:
                for row in await self.store.claim_heads(name, self.clock(), set(self._in_flight), free):
                    key = (row.source, row.batch_id)
                    if key in self._in_flight:
                        continue
                    task = asyncio.create_task(self._deliver(row), name=f"poller.delivery[{name}].{row.batch_id}")
                    self._in_flight[key] = (row, task)
                    task.add_done_callback(lambda _task: self._wake.set())
            await self._sleep()

    async def _reap(self) -> None:
        """Record every finished send: all acknowledgements since the last look in one transaction.

        A batch stays in flight until its row is marked delivered, so its next row cannot overtake it.
        """
        finished = [(key, row, task) for key, (row, task) in self._in_flight.items() if task.done()]
        if not finished:
            return
        delivered: list[tuple[OutboxRow, float]] = []
        for _, row, task in finished:
            error = None if task.cancelled() else task.exception()
            if error is not None:  # _deliver catches everything; this is a bug, and the row stays queued
                log.error("delivery task failed", sink=self.sink.name, event_id=row.event_id, exc_info=error)
            elif not task.cancelled() and (detected_at := task.result()) is not None:
                delivered.append((row, detected_at))
        if delivered:
            now = self.clock()
            await self.store.mark_delivered(self.sink.name, [row.event_id for row, _ in delivered], now)
            self.delivered += len(delivered)
            self.metrics.deliveries.labels(self.sink.name, "delivered").inc(len(delivered))
            latency = self.metrics.delivery_latency.labels(self.sink.name)
            for _, detected_at in delivered:
                latency.observe(max(now - detected_at, 0.0))
        for key, _, _ in finished:
            del self._in_flight[key]

    async def _sleep(self) -> None:
        """Until new rows, a finished send, or the next retry comes due (at most IDLE_CHECK)."""
        timeout = IDLE_CHECK
        if len(self._in_flight) < self.sink.max_in_flight and not self._wake.is_set():
            due = await self.store.next_ready_at(self.sink.name, set(self._in_flight))
            if due is not None:
                timeout = min(max(due - self.clock(), 0.0), IDLE_CHECK)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _deliver(self, row: OutboxRow) -> float | None:
        """Send one row; returns its detection time once acknowledged, None when the failure was recorded."""
        name = self.sink.name
        try:
            event = decode(row.payload)
        except ValueError as exc:  # a stored payload this version cannot read: never retry it in a loop
            await self._record_failure(
                row, DeliveryError(name, f"stored event does not decode: {exc}", retryable=False)
            )
            return None
        try:
            await self.sink.send(event, row.payload)
        except DeliveryError as exc:
            await self._record_failure(row, exc)
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a sink must not kill delivery: count it as retryable
            log.exception("sink raised unexpectedly", sink=name, batch_id=row.batch_id, event_id=row.event_id)
            await self._record_failure(row, DeliveryError(name, repr(exc), retryable=True))
            return None
        if self._failing:
            self._failing = False
            self.metrics.sink_up.labels(name).set(1)
            log.info("sink recovered", sink=name)
        return event.data.detected_at

    async def _record_failure(self, row: OutboxRow, exc: DeliveryError) -> None:
        name, now = self.sink.name, self.clock()
        attempts = row.attempts + 1
        self.last_error = str(exc)[:300]
        if exc.disable:
            await self.store.mark_retry(name, row.event_id, now + 3600.0, str(exc), now)
            self.disabled = True
            self._stopping = True
            self.metrics.deliveries.labels(name, "disabled").inc()
            self.metrics.sink_up.labels(name).set(0)
            log.error("sink disabled by the receiver; its rows stay queued", sink=name, status=exc.status)
            self._wake.set()
            return
        delay = retry_delay(self.sink.retry_schedule, attempts, exc, self.rand) if exc.retryable else None
        if delay is None:
            await self.store.mark_dead(name, row.event_id, str(exc), now)
            self.metrics.deliveries.labels(name, "dead").inc()
            log.warning(
                "delivery dead-lettered",
                sink=name,
                batch_id=row.batch_id,
                event_id=row.event_id,
                status=exc.status,
                attempts=attempts,
                error=str(exc),
            )
            return
        await self.store.mark_retry(name, row.event_id, now + delay, str(exc), now)
        self.metrics.deliveries.labels(name, "retry").inc()
        if not self._failing:
            self._failing = True
            self.metrics.sink_up.labels(name).set(0)
            log.warning("sink failing; retrying", sink=name, error=str(exc), status=exc.status)
        else:
            log.debug("delivery retry", sink=name, batch_id=row.batch_id, delay=round(delay, 2), error=str(exc))

    async def stop(self, deadline: float) -> None:
        """Stop taking rows; let in-flight sends finish for up to `deadline` seconds, then cancel them."""
        self._stopping = True
        self._wake.set()
        tasks = [task for _, task in self._in_flight.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        await self._reap()  # acknowledged before the deadline: recorded, never sent again
