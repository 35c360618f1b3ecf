"""Draining one sink's outbox: send due queue heads, record each outcome.

Promises: per batch, rows go out in `sequence` order and the next waits until the previous one was
delivered or dead-lettered; different batches proceed concurrently up to the sink's `max_in_flight`.
A row is marked delivered only after the sink acknowledged it. Retries follow the sink's schedule
(`poller.delivery.retry`).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from poller.aio import wait_event
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
#: While handed-over rows keep the worker busy, it still reads the outbox's due heads this often
#: (retries and rows promoted behind delivered ones must not wait behind a stream of new events).
CLAIM_EVERY = 0.25
#: At most this many handed-over rows are held; beyond that, rows are read from the outbox.
HANDED_LIMIT = 100_000
#: An outbox read asks for this many due heads per send slot beyond the free ones: they wait in memory
#: (`_ahead`), so a backlog refills each slot without a store round trip per event.
READ_AHEAD = 4
#: How many outbox reads' worth of taken event ids a worker remembers against a late hand-over. The
#: recorder hands a write's new heads over as soon as the write returns, so an outbox read can only
#: take such a row in between (a read or two at most, on a store of several connections).
TAKEN_READS = 16
#: Acknowledged rows are recorded together: once half the slots' worth waits, nothing else is in flight, or
#: the oldest has waited this long (seconds). Fewer, larger transactions on the store's thread, whose
#: share of the interpreter otherwise slows every socket call of the sends.
ACK_GATHER = 0.005
#: A head read ahead and not sent within this long is read again (a shared store's claim on it lasts far
#: longer, so another replica never takes it meanwhile).
AHEAD_TTL = 5.0


def taken_memory(max_in_flight: int) -> int:
    """Event ids remembered against a late hand-over: `TAKEN_READS` outbox reads, each of at most the
    free slots plus `READ_AHEAD` per slot (1,280 for the default 16 in flight: some 200 kB, where a
    fixed 50,000 held 9 MB once a large first sight had gone out)."""
    return TAKEN_READS * (1 + READ_AHEAD) * max_in_flight


@dataclass(frozen=True, slots=True)
class _Acked:
    """A send the sink acknowledged: when its event was detected and when the acknowledgement came."""

    detected_at: float
    at: float


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
        self._in_flight: dict[tuple[str, str], tuple[OutboxRow, asyncio.Task[_Acked | None]]] = {}
        # Sent and acknowledged, not yet marked delivered: still busy, so their batch's next row waits.
        self._acking: dict[tuple[str, str], tuple[OutboxRow, _Acked]] = {}
        self._ack_task: asyncio.Task[None] | None = None
        self._acking_since: float | None = None  # monotonic time the oldest unrecorded acknowledgement came
        # Heads handed over by the recorder (`offer`), sent without reading the outbox back.
        self._handed: dict[str, OutboxRow] = {}
        # Due heads read from the outbox beyond the free slots, oldest first, with when they were read.
        self._ahead: dict[tuple[str, str], tuple[OutboxRow, float]] = {}
        # Event ids recently taken from the outbox, so a late hand-over of the same row is not sent twice.
        self._taken: deque[str] = deque(maxlen=taken_memory(sink.max_in_flight))
        self._taken_ids: set[str] = set()
        self._last_claim = -math.inf
        self.disabled = False
        self._failing = False
        self.delivered = 0
        self.last_error: str | None = None

    def wake(self) -> None:
        self._wake.set()

    def offer(self, row: OutboxRow) -> None:
        """A row the store just made its batch's head (due now); sent from memory, no outbox read."""
        if row.event_id not in self._taken_ids and len(self._handed) < HANDED_LIMIT:
            self._handed[row.event_id] = row
        self._wake.set()

    def forget_offers(self) -> None:
        """Another process changed the outbox (e.g. `redeliver`): read heads from the store again."""
        self._handed.clear()
        self._ahead.clear()
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        while not self._stopping and not self.disabled:
            self._wake.clear()
            self._collect()
            self._acknowledge()
            free = self._fill()
            now = time.monotonic()
            if free > 0 and (not self._handed or now - self._last_claim >= CLAIM_EVERY):
                # Retries, the rows promoted behind delivered ones, anything from before this start.
                self._last_claim = now
                busy = self._busy()
                limit = free + READ_AHEAD * self.sink.max_in_flight
                rows = await self.store.claim_heads(self.sink.name, self.clock(), busy, limit)
                busy = self._busy()  # sends may have finished meanwhile, none started
                for row in rows:
                    key = (row.source, row.batch_id)
                    if key in busy:
                        continue
                    busy.add(key)
                    self._handed.pop(row.event_id, None)
                    self._remember(row.event_id)
                    if free > 0:
                        self._start(row)
                        free -= 1
                    else:
                        self._ahead[key] = (row, now)
            await self._sleep()

    def _busy(self) -> set[tuple[str, str]]:
        """Batches with a row out (sent, or acknowledged and not yet recorded) or read ahead."""
        return set(self._in_flight) | set(self._acking) | set(self._ahead)

    def _fill(self) -> int:
        """Start sends from the rows read ahead, then from those handed over; returns the slots left free."""
        free = self.sink.max_in_flight - len(self._in_flight)
        if free > 0 and self._ahead:
            stale = time.monotonic() - AHEAD_TTL
            for key, (row, read_at) in list(self._ahead.items()):
                if free <= 0:
                    break
                del self._ahead[key]
                if read_at >= stale:  # else read again, as the head it still is (or no longer is)
                    self._start(row)
                    free -= 1
        if free > 0 and self._handed:
            for row in self._take_handed(free):
                self._start(row)
                free -= 1
        return free

    def _take_handed(self, free: int) -> list[OutboxRow]:
        busy = self._busy()
        taken: list[OutboxRow] = []
        for row in self._handed.values():  # no copy of the dict: it may hold a whole burst
            if len(taken) >= free:
                break
            key = (row.source, row.batch_id)
            if key in busy:  # another row of the batch is out: this one waits for the outbox read
                continue
            busy.add(key)
            taken.append(row)
        for row in taken:
            del self._handed[row.event_id]
            self._remember(row.event_id)
        return taken

    def _remember(self, event_id: str) -> None:
        if len(self._taken) == self._taken.maxlen:
            self._taken_ids.discard(self._taken[0])
        self._taken.append(event_id)
        self._taken_ids.add(event_id)

    def _start(self, row: OutboxRow) -> None:
        key = (row.source, row.batch_id)
        task = asyncio.create_task(self._deliver(row), name=f"poller.delivery[{self.sink.name}].{row.batch_id}")
        self._in_flight[key] = (row, task)
        task.add_done_callback(lambda _task: self._wake.set())

    def _collect(self) -> None:
        """Move finished sends out of flight; acknowledged ones wait (busy) until marked delivered."""
        finished = [(key, row, task) for key, (row, task) in self._in_flight.items() if task.done()]
        for key, row, task in finished:
            del self._in_flight[key]
            error = None if task.cancelled() else task.exception()
            if error is not None:  # _deliver catches everything; this is a bug, and the row stays queued
                log.error("delivery task failed", sink=self.sink.name, event_id=row.event_id, exc_info=error)
            elif not task.cancelled() and (acked := task.result()) is not None:
                self._acking[key] = (row, acked)
                if self._acking_since is None:
                    self._acking_since = time.monotonic()

    def _acknowledge(self, *, now: bool = False) -> None:
        """Mark every acknowledged row delivered, in one transaction, while the next sends go out."""
        if self._ack_task is None and self._acking and (now or self._ack_wait() <= 0):
            self._acking_since = None
            batch = dict(self._acking)
            self._ack_task = asyncio.create_task(self._mark(batch), name=f"poller.delivery[{self.sink.name}].ack")

    def _ack_wait(self) -> float:
        """Seconds until the acknowledged rows should be recorded (0: now)."""
        if self._acking_since is None or not self._in_flight or len(self._acking) * 2 >= self.sink.max_in_flight:
            return 0.0
        return ACK_GATHER - (time.monotonic() - self._acking_since)

    async def _mark(self, batch: dict[tuple[str, str], tuple[OutboxRow, _Acked]]) -> None:
        # Recorded as delivered at the latest acknowledgement among them (the sink's, not this write's time).
        acked_at = max(acked.at for _, acked in batch.values())
        try:
            await self.store.mark_delivered(self.sink.name, [row.event_id for row, _ in batch.values()], acked_at)
        except Exception:  # the rows stay queued (sent again later: at least once); keep delivering
            log.exception("recording deliveries failed", sink=self.sink.name, rows=len(batch))
            await asyncio.sleep(1.0)
        else:
            self.delivered += len(batch)
            self.metrics.deliveries.labels(self.sink.name, "delivered").inc(len(batch))
            latency = self.metrics.delivery_latency.labels(self.sink.name)
            for _, acked in batch.values():
                latency.observe(max(acked.at - acked.detected_at, 0.0))
        finally:
            for key in batch:
                self._acking.pop(key, None)
            self._ack_task = None
            self._wake.set()

    async def _reap(self) -> None:
        """Record every finished send (used when stopping)."""
        self._collect()
        while self._ack_task is not None or self._acking:
            if self._ack_task is None:
                self._acknowledge(now=True)
            if self._ack_task is not None:
                await asyncio.wait((self._ack_task,))

    async def _sleep(self) -> None:
        """Until new rows, a finished send, or the next retry comes due (at most IDLE_CHECK)."""
        timeout = IDLE_CHECK
        if self._acking and self._ack_task is None:
            timeout = max(self._ack_wait(), 0.0)
        if self._handed:
            timeout = min(timeout, CLAIM_EVERY)
        elif len(self._in_flight) < self.sink.max_in_flight and not self._wake.is_set():
            due = await self.store.next_ready_at(self.sink.name, self._busy())
            if due is not None:
                timeout = min(timeout, max(due - self.clock(), 0.0))
        await wait_event(self._wake, timeout)

    async def _deliver(self, row: OutboxRow) -> _Acked | None:
        """Send one row; returns when it was detected and acknowledged, None when the failure was recorded."""
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
        acked = _Acked(event.data.detected_at, self.clock())
        if self._failing:
            self._failing = False
            self.metrics.sink_up.labels(name).set(1)
            log.info("sink recovered", sink=name)
        return acked

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
