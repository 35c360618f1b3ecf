"""The delivery worker against a real SQLite outbox and an in-memory sink: reading heads ahead keeps order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from poller.delivery.worker import DeliveryWorker
from poller.domain.events import Event, encode
from poller.metrics import Metrics
from poller.store import open_store
from poller.store.base import NewEvent, OutboxRow, Store, TrackedBatch, Write
from tests.helpers import status_event, until

SOURCE = "openai"
SINK = "mem"


class MemorySink:
    """Acknowledges each send at once, or once `gate` is set for the batches in `held`; records the order."""

    retry_schedule: Sequence[float] | None = None

    def __init__(self, max_in_flight: int) -> None:
        self.name = SINK
        self.max_in_flight = max_in_flight
        self.received: list[tuple[str, int]] = []
        self.held: set[str] = set()
        self.gate = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def send(self, event: Event, payload: bytes) -> None:
        del payload
        self.received.append((event.batch_id, event.data.sequence))
        if event.batch_id in self.held:
            await self.gate.wait()

    def health(self) -> str:
        return "ok"


class CountingStore:
    """The store, counting the worker's outbox reads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.claims = 0

    async def claim_heads(self, sink: str, now: float, busy: set[tuple[str, str]], limit: int) -> list[OutboxRow]:
        self.claims += 1
        return await self.store.claim_heads(sink, now, busy, limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(tmp_path / "state.db") as s:
        yield s


async def enqueue(store: Store, batches: dict[str, int]) -> dict[str, list[Event]]:
    """`batches[id]` events for each batch (sequence 1, 2, ...), each pending for SINK, oldest batch first."""
    now = time.time()
    types = ["batch.validating", "batch.in_progress", "batch.finalizing", "batch.completed"]
    made: dict[str, list[Event]] = {}
    await store.track(SOURCE, list(batches), "test", now)
    for n, (batch_id, count) in enumerate(batches.items()):
        at = now + n * 0.001  # enqueued one after the other: heads come oldest first
        events = [status_event(batch_id, types[i], i + 1) for i in range(count)]
        rows = [
            NewEvent(ev.id, ev.type, ev.data.sequence, ev.created_at, ev.data.detected_at, encode(ev), [SINK])
            for ev in events
        ]
        await store.record([Write(TrackedBatch(SOURCE, batch_id, "test", now), rows)], at)
        made[batch_id] = events
    return made


async def pending(store: Store) -> int:
    return len(await store.deliveries(SINK, states=("pending",)))


async def test_a_backlog_goes_out_in_order_with_one_outbox_read_per_many_rows(store: Store) -> None:
    await enqueue(store, {f"batch_{i:03d}": 2 for i in range(200)})
    counting = CountingStore(store)
    sink = MemorySink(max_in_flight=4)
    worker = DeliveryWorker(counting, sink, Metrics())  # type: ignore[arg-type]  # a delegating wrapper
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: _none_pending(store))
    finally:
        await worker.stop(1.0)
        await asyncio.gather(task, return_exceptions=True)
    assert len(sink.received) == 400
    for batch_id in {b for b, _ in sink.received}:
        assert [s for b, s in sink.received if b == batch_id] == [1, 2]
    assert counting.claims <= 400 // 4  # heads are read ahead, not one store round trip per row


async def _none_pending(store: Store) -> bool:
    return await pending(store) == 0


async def test_rows_read_ahead_are_dropped_when_another_process_changed_the_outbox(store: Store) -> None:
    events = await enqueue(store, {"batch_a": 1, "batch_b": 2})
    b1 = events["batch_b"][0]
    await store.mark_dead(SINK, b1.id, "refused", time.time())  # b's second row is now its head
    sink = MemorySink(max_in_flight=1)
    sink.held = {"batch_a"}
    worker = DeliveryWorker(store, sink, Metrics())
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: _received(sink, 1))  # a's row is out; b's head was read with it and waits
        assert await store.redeliver(SINK, b1.id, time.time()) == 1  # as `batch-poller redeliver` does
        worker.forget_offers()  # what the daemon does when another process changed the store
        sink.gate.set()
        await until(lambda: _none_pending(store))
    finally:
        await worker.stop(1.0)
        await asyncio.gather(task, return_exceptions=True)
    assert sink.received == [("batch_a", 1), ("batch_b", 1), ("batch_b", 2)]


async def _received(sink: MemorySink, count: int) -> bool:
    return len(sink.received) >= count


async def test_an_acknowledged_row_is_recorded_while_another_batch_stays_in_flight(store: Store) -> None:
    events = await enqueue(store, {"batch_a": 1, "batch_b": 2})
    sink = MemorySink(max_in_flight=4)
    sink.held = {"batch_a"}  # its send never returns until the end: acknowledgements must not wait for it
    worker = DeliveryWorker(store, sink, Metrics())
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: _delivered(store, {ev.id for ev in events["batch_b"]}))
        assert sink.received[0] == ("batch_a", 1)
        sink.gate.set()
        await until(lambda: _none_pending(store))
    finally:
        await worker.stop(1.0)
        await asyncio.gather(task, return_exceptions=True)
    assert [s for b, s in sink.received if b == "batch_b"] == [1, 2]


async def _delivered(store: Store, ids: set[str]) -> bool:
    rows = await store.deliveries(SINK, states=("delivered",))
    return ids <= {row.event_id for row in rows}


async def test_a_row_handed_over_after_an_outbox_read_took_it_is_not_sent_again(store: Store) -> None:
    # The recorder hands a write's new heads over once the write returns; on a store of several connections,
    # an outbox read may take them first. Each is sent once however many reads of the worker came between.
    await enqueue(store, {f"batch_{i:03d}": 1 for i in range(30)})
    late = await store.claim_heads(SINK, time.time(), set(), 100)  # SQLite's claim is a plain read
    sink = MemorySink(max_in_flight=2)
    worker = DeliveryWorker(store, sink, Metrics())
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: _none_pending(store))
        for row in late:
            worker.offer(row)
        await enqueue(store, {"batch_later": 1})  # read from the outbox after the late hand-overs
        await until(lambda: _none_pending(store))
    finally:
        await worker.stop(1.0)
        await asyncio.gather(task, return_exceptions=True)
    assert len(late) == 30
    assert sorted(sink.received) == sorted([(row.batch_id, 1) for row in late] + [("batch_later", 1)])
