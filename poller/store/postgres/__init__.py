"""The PostgreSQL store, shared by replicas: psycopg 3 with a connection pool, one transaction per call.

The schema is created and migrated on start (`_schema.py`). Every write notifies the others
(`NOTIFY batch_poller`), which surface as `changes()`; a timer compares a revision counter as the
fallback when a notification is lost (a dropped listening connection).

Needs a session-level connection for LISTEN: not behind PgBouncer in transaction mode (docs/replicas.md).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from poller.errors import ConfigError
from poller.store.base import (
    Delivery,
    LoggedEvent,
    NewEvent,
    OutboxRow,
    Recorded,
    TrackedBatch,
    Write,
    default_replica_name,
)
from poller.store.postgres import batches as b
from poller.store.postgres import events as e
from poller.store.postgres import leases as le
from poller.store.postgres import outbox as o
from poller.store.postgres._schema import SCHEMA_VERSION, migrate
from poller.store.postgres.batches import Conn

T = TypeVar("T")
CHANNEL = "batch_poller"
#: How often changes() checks the revision when no notification came.
FALLBACK_INTERVAL = 5.0
CONNECT_TIMEOUT = 10


class PostgresStore:
    """The PostgreSQL implementation of `poller.store.base.Store`.

    `conninfo` is a libpq URL or key=value string with the password already in it (never logged);
    `description` is what may be shown. `name` identifies this replica in the claims it holds.
    """

    def __init__(
        self,
        conninfo: str,
        description: str,
        *,
        name: str | None = None,
        pool_size: int = 4,
        claim_ttl: float = o.CLAIM_TTL,
    ) -> None:
        self.conninfo = conninfo
        self.description = description
        self.name = name or default_replica_name()
        self.pool_size = pool_size
        self.claim_ttl = claim_ttl
        # Tells this store's own notifications from other connections'.
        self._token = secrets.token_hex(8)
        self._pool: AsyncConnectionPool[Conn] | None = None

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION

    async def _connect(self) -> Conn:
        try:
            return await psycopg.AsyncConnection.connect(
                self.conninfo, connect_timeout=CONNECT_TIMEOUT, row_factory=dict_row
            )
        except psycopg.Error as exc:
            raise ConfigError(
                "state.url",
                f"cannot connect to {self.description}: {str(exc).strip()}",
                "check state.url, the password (state.password_env or state.password_file) and that the"
                " server accepts this client",
            ) from None

    async def __aenter__(self) -> Self:
        conn = await self._connect()
        try:
            await migrate(conn, self.description)
        finally:
            await conn.close()
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT},
            open=False,
            name="poller.postgres",
        )
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        self._pool = pool
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is not None:
            with contextlib.suppress(psycopg.Error):  # else they run out on their own
                await self._run(lambda c: o.release_claims(c, self.name), write=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _run(self, fn: Callable[[Conn], Awaitable[T]], *, write: bool = False) -> T:
        """Run `fn` in one transaction on a pooled connection.

        `write` notifies the other connections: for what they must catch up with (the tracked set, new
        outbox rows, redelivered rows), not for acknowledgements, which would wake every replica per send.
        """
        assert self._pool is not None, "use the store as an async context manager"
        async with self._pool.connection() as conn, conn.transaction():
            result = await fn(conn)
            if write:
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._token))
            return result

    async def _revision(self, conn: Conn) -> int:
        cur = await conn.execute("SELECT value FROM revision WHERE id = 1")
        found = await cur.fetchone()
        return int(found["value"]) if found else 0

    async def changes(self) -> AsyncIterator[None]:
        listener: Conn | None = None
        try:
            last = await self._run(self._revision)
            while True:
                if listener is None or listener.closed:
                    listener = await self._connect()
                    await listener.set_autocommit(True)
                    await listener.execute(f"LISTEN {CHANNEL}")
                notified = False
                try:
                    async for note in listener.notifies(timeout=FALLBACK_INTERVAL, stop_after=1):
                        notified = note.payload != self._token
                except psycopg.OperationalError:
                    await listener.close()
                    listener = None  # reconnect; the revision check below covers what was missed
                revision = await self._run(self._revision)
                if notified or revision != last:
                    last = revision
                    yield None
        finally:
            if listener is not None:
                with contextlib.suppress(psycopg.Error):
                    await listener.close()

    # -- tracked batches -------------------------------------------------------------------------

    async def track(self, source: str, ids: Iterable[str], origin: str, now: float) -> list[str]:
        items = list(ids)
        return await self._run(lambda c: b.track(c, source, items, origin, now), write=True)

    async def untrack(self, source: str, ids: Iterable[str], now: float) -> list[str]:
        items = list(ids)
        return await self._run(lambda c: b.untrack(c, source, items, now), write=True)

    async def untracked(self, source: str, ids: Iterable[str]) -> set[str]:
        items = list(ids)
        return await self._run(lambda c: b.untracked(c, source, items))

    async def batches(
        self, source: str | None = None, states: Sequence[str] | None = None, *, with_raw: bool = False
    ) -> list[TrackedBatch]:
        return await self._run(lambda c: b.batches(c, source, states, with_raw=with_raw))

    async def batch(self, source: str, batch_id: str) -> TrackedBatch | None:
        return await self._run(lambda c: b.batch(c, source, batch_id))

    async def save_schedule(self, batches: Iterable[TrackedBatch]) -> None:
        rows = list(batches)
        await self._run(lambda c: b.save_schedule(c, rows))

    async def prune(self, before: float, source: str | None = None) -> list[TrackedBatch]:
        return await self._run(lambda c: b.prune(c, before, source), write=True)

    async def cursor(self, source: str, name: str) -> str | None:
        return await self._run(lambda c: b.cursor(c, source, name))

    async def set_cursor(self, source: str, name: str, value: str) -> None:
        await self._run(lambda c: b.set_cursor(c, source, name, value))

    # -- the event log ---------------------------------------------------------------------------

    async def record(self, writes: Sequence[Write], now: float) -> Recorded:
        items = list(writes)
        return await self._run(lambda c: e.record(c, items, now), write=True)

    async def record_orphan(self, source: str, batch_id: str, event: NewEvent, now: float) -> int:
        return await self._run(lambda c: e.record_orphan(c, source, batch_id, event, now), write=True)

    async def events_for(self, source: str | None, batch_id: str) -> list[dict[str, Any]]:
        return await self._run(lambda c: e.events_for(c, source, batch_id))

    async def read_events(
        self,
        after: int,
        limit: int,
        *,
        sources: Sequence[str] = (),
        batch_ids: Sequence[str] = (),
        types: Sequence[str] = (),
    ) -> list[LoggedEvent]:
        return await self._run(
            lambda c: e.read_events(c, after, limit, sources=sources, batch_ids=batch_ids, types=types)
        )

    async def last_position(self) -> int:
        return await self._run(e.last_position)

    # -- the outbox ------------------------------------------------------------------------------

    async def claim_heads(self, sink: str, now: float, busy: set[tuple[str, str]], limit: int) -> list[OutboxRow]:
        taken = set(busy)
        return await self._run(
            lambda c: o.claim_heads(c, self.name, sink, now=now, busy=taken, limit=limit, ttl=self.claim_ttl)
        )

    async def next_ready_at(self, sink: str, busy: set[tuple[str, str]]) -> float | None:
        taken = set(busy)
        return await self._run(lambda c: o.next_ready_at(c, self.name, sink, taken))

    async def mark_delivered(self, sink: str, event_ids: Sequence[str], now: float) -> None:
        items = list(event_ids)
        await self._run(lambda c: o.finish(c, sink, items, state="delivered", error=None, now=now))

    async def mark_dead(self, sink: str, event_id: str, error: str, now: float) -> None:
        await self._run(lambda c: o.finish(c, sink, [event_id], state="dead", error=error[:500], now=now))

    async def mark_retry(self, sink: str, event_id: str, next_attempt_at: float, error: str, now: float) -> None:
        await self._run(
            lambda c: o.mark_retry(c, sink, event_id, next_attempt_at=next_attempt_at, error=error, now=now)
        )

    async def deliveries(self, sink: str | None = None, states: Sequence[str] = ("pending", "dead")) -> list[Delivery]:
        return await self._run(lambda c: o.deliveries(c, sink, tuple(states)))

    async def redeliver(self, sink: str | None, event_id: str | None, now: float) -> int:
        return await self._run(lambda c: o.redeliver(c, sink, event_id, now), write=True)

    async def outbox_stats(self) -> dict[str, dict[str, Any]]:
        return await self._run(o.outbox_stats)

    # -- leases ----------------------------------------------------------------------------------

    async def acquire_leases(self, holder: str, sources: Sequence[str], now: float, ttl: float) -> list[str]:
        items = list(sources)
        return await self._run(lambda c: le.acquire(c, holder, items, now=now, ttl=ttl))

    async def release_leases(self, holder: str, sources: Sequence[str] | None = None) -> None:
        items = None if sources is None else list(sources)
        await self._run(lambda c: le.release(c, holder, items), write=True)

    async def leases(self) -> dict[str, tuple[str, float]]:
        return await self._run(le.leases)


__all__ = ["PostgresStore", "default_replica_name"]
