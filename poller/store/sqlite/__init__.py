"""The SQLite store, the embedded default: one file in WAL mode, owned by one daemon process (the CLI
may open it at the same time).

Every call runs on one thread of the store's own, so SQLite's work (and its fsyncs) never holds the
event loop; each write is one transaction. Other processes' commits are noticed through
`PRAGMA data_version` and surface as `changes()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from poller.store.base import Delivery, LoggedEvent, NewEvent, OutboxRow, Recorded, TrackedBatch, Write
from poller.store.sqlite._conn import SCHEMA_VERSION, Connection
from poller.store.sqlite.batches import BatchRows
from poller.store.sqlite.events import EventRows
from poller.store.sqlite.leases import LeaseRows
from poller.store.sqlite.outbox import OutboxRows

T = TypeVar("T")
#: How often `changes()` asks whether another process committed.
CHANGE_POLL = 0.25


class _Rows(BatchRows, EventRows, OutboxRows, LeaseRows):
    def __init__(self, conn: Connection) -> None:
        self.conn = conn


class SqliteStore:
    """The SQLite implementation of `poller.store.base.Store`."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.description = f"sqlite:{path}"
        self._executor: ThreadPoolExecutor | None = None
        self._rows: _Rows | None = None

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poller.sqlite")
        try:
            conn = await self._call(Connection, self.path, readonly=self.readonly)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._rows = _Rows(conn)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        rows, self._rows = self._rows, None
        if rows is not None:
            await self._call(rows.conn.close)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._executor is not None, "use the store as an async context manager"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    @property
    def _r(self) -> _Rows:
        assert self._rows is not None, "use the store as an async context manager"
        return self._rows

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION

    async def changes(self) -> AsyncIterator[None]:
        last = await self._call(self._r.conn.data_version)
        while True:
            await asyncio.sleep(CHANGE_POLL)
            version = await self._call(self._r.conn.data_version)
            if version != last:
                last = version
                yield None

    # -- tracked batches -------------------------------------------------------------------------

    async def track(self, source: str, ids: Iterable[str], origin: str, now: float) -> list[str]:
        return await self._call(self._r.track, source, list(ids), origin, now)

    async def untrack(self, source: str, ids: Iterable[str], now: float) -> list[str]:
        return await self._call(self._r.untrack, source, list(ids), now)

    async def untracked(self, source: str, ids: Iterable[str]) -> set[str]:
        return await self._call(self._r.untracked, source, list(ids))

    async def batches(
        self, source: str | None = None, states: Sequence[str] | None = None, *, with_raw: bool = False
    ) -> list[TrackedBatch]:
        return await self._call(self._r.batches, source, states, with_raw=with_raw)

    async def batch(self, source: str, batch_id: str) -> TrackedBatch | None:
        return await self._call(self._r.batch, source, batch_id)

    async def save_schedule(self, batches: Iterable[TrackedBatch]) -> None:
        await self._call(self._r.save_schedule, list(batches))

    async def prune(self, before: float, source: str | None = None) -> list[TrackedBatch]:
        return await self._call(self._r.prune, before, source)

    async def cursor(self, source: str, name: str) -> str | None:
        return await self._call(self._r.cursor, source, name)

    async def set_cursor(self, source: str, name: str, value: str) -> None:
        await self._call(self._r.set_cursor, source, name, value)

    # -- the event log ---------------------------------------------------------------------------

    async def record(self, writes: Sequence[Write], now: float) -> Recorded:
        return await self._call(self._r.record, list(writes), now)

    async def record_orphan(self, source: str, batch_id: str, event: NewEvent, now: float) -> int:
        return await self._call(self._r.record_orphan, source, batch_id, event, now)

    async def events_for(self, source: str | None, batch_id: str) -> list[dict[str, Any]]:
        return await self._call(self._r.events_for, source, batch_id)

    async def read_events(
        self,
        after: int,
        limit: int,
        *,
        sources: Sequence[str] = (),
        batch_ids: Sequence[str] = (),
        types: Sequence[str] = (),
    ) -> list[LoggedEvent]:
        return await self._call(self._r.read_events, after, limit, sources=sources, batch_ids=batch_ids, types=types)

    async def last_position(self) -> int:
        return await self._call(self._r.last_position)

    # -- the outbox ------------------------------------------------------------------------------

    async def claim_heads(self, sink: str, now: float, busy: set[tuple[str, str]], limit: int) -> list[OutboxRow]:
        return await self._call(self._r.claim_heads, sink, now, set(busy), limit)

    async def next_ready_at(self, sink: str, busy: set[tuple[str, str]]) -> float | None:
        return await self._call(self._r.next_ready_at, sink, set(busy))

    async def mark_delivered(self, sink: str, event_ids: Sequence[str], now: float) -> None:
        await self._call(self._r.mark_delivered, sink, list(event_ids), now)

    async def mark_dead(self, sink: str, event_id: str, error: str, now: float) -> None:
        await self._call(self._r.mark_dead, sink, event_id, error, now)

    async def mark_retry(self, sink: str, event_id: str, next_attempt_at: float, error: str, now: float) -> None:
        await self._call(self._r.mark_retry, sink, event_id, next_attempt_at, error, now)

    async def deliveries(self, sink: str | None = None, states: Sequence[str] = ("pending", "dead")) -> list[Delivery]:
        return await self._call(self._r.deliveries, sink, tuple(states))

    async def redeliver(self, sink: str | None, event_id: str | None, now: float) -> int:
        return await self._call(self._r.redeliver, sink, event_id, now)

    async def outbox_stats(self) -> dict[str, dict[str, Any]]:
        return await self._call(self._r.outbox_stats)

    # -- leases ----------------------------------------------------------------------------------

    async def acquire_leases(self, holder: str, sources: Sequence[str], now: float, ttl: float) -> list[str]:
        return await self._call(self._r.acquire_leases, holder, list(sources), now, ttl)

    async def release_leases(self, holder: str, sources: Sequence[str] | None = None) -> None:
        await self._call(self._r.release_leases, holder, None if sources is None else list(sources))

    async def leases(self) -> dict[str, tuple[str, float]]:
        return await self._call(self._r.leases)


__all__ = ["SqliteStore"]
