"""Tracked batches and cursors on PostgreSQL: each function runs inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import AsyncConnection
from psycopg.rows import DictRow, tuple_row

from poller.domain.lifecycle import RANK
from poller.domain.transitions import Knowledge
from poller.store.base import ACTIVE, GONE, TrackedBatch
from poller.store.codec import Decoder, batch_columns, knowledge_to_json, no_collection

Conn = AsyncConnection[DictRow]


async def bump_revision(conn: Conn) -> None:
    """Tell the timer fallback of other replicas' changes() that the tracked set or the queues moved."""
    await conn.execute("UPDATE revision SET value = value + 1 WHERE id = 1")


async def track(conn: Conn, source: str, ids: Sequence[str], origin: str, now: float) -> list[str]:
    added = []
    for batch_id in ids:
        cur = await conn.execute(
            "INSERT INTO batches (source, id, origin, added_at, next_due) VALUES (%s, %s, %s, %s, 0)"
            " ON CONFLICT (source, id) DO NOTHING",
            (source, batch_id, origin, now),
        )
        if not cur.rowcount:
            revived = await conn.execute(
                "UPDATE batches SET state = %s, not_found = 0, error_streak = 0, next_due = 0,"
                " finished_at = NULL WHERE source = %s AND id = %s AND state = %s",
                (ACTIVE, source, batch_id, GONE),
            )
            if revived.rowcount:
                added.append(batch_id)
            continue
        added.append(batch_id)
        await conn.execute("DELETE FROM untracked WHERE source = %s AND id = %s", (source, batch_id))
        await _resume(conn, source, batch_id)
    if added:
        await bump_revision(conn)
    return added


async def _resume(conn: Conn, source: str, batch_id: str) -> None:
    """A batch tracked before resumes its recorded sequence and the statuses it announced."""
    cur = await conn.execute(
        "SELECT type, sequence FROM events WHERE source = %s AND batch_id = %s", (source, batch_id)
    )
    history = await cur.fetchall()
    if not history:
        return
    known = Knowledge(
        sequence=max(int(r["sequence"]) for r in history),
        seen=frozenset(str(r["type"]).removeprefix("batch.") for r in history) & RANK.keys(),
    )
    await conn.execute(
        "UPDATE batches SET knowledge = %s, sequence = %s WHERE source = %s AND id = %s",
        (knowledge_to_json(known), known.sequence, source, batch_id),
    )


async def untrack(conn: Conn, source: str, ids: Sequence[str], now: float) -> list[str]:
    removed: list[str] = []
    for batch_id in ids:
        cur = await conn.execute("DELETE FROM batches WHERE source = %s AND id = %s", (source, batch_id))
        if cur.rowcount:
            removed.append(batch_id)
            await conn.execute(
                "INSERT INTO untracked (source, id, at) VALUES (%s, %s, %s)"
                " ON CONFLICT (source, id) DO UPDATE SET at = excluded.at",
                (source, batch_id, now),
            )
    if removed:
        await bump_revision(conn)
    return removed


async def untracked(conn: Conn, source: str, ids: Sequence[str]) -> set[str]:
    cur = await conn.execute("SELECT id FROM untracked WHERE source = %s AND id = ANY(%s)", (source, list(ids)))
    return {str(r["id"]) for r in await cur.fetchall()}


async def batches(
    conn: Conn, source: str | None, states: Sequence[str] | None, *, with_raw: bool
) -> list[TrackedBatch]:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(
            f"SELECT {batch_columns(with_raw=with_raw)} FROM batches"
            " WHERE (%(source)s::text IS NULL OR source = %(source)s)"
            " AND (%(states)s::text[] IS NULL OR state = ANY(%(states)s)) ORDER BY added_at, id, source",
            {"source": source, "states": list(states) if states else None},
        )
        rows = await cur.fetchall()
    decoder = Decoder()
    with no_collection():  # as the SQLite store: the rows hold no cycles
        return [decoder.batch(r, with_raw=with_raw) for r in rows]


async def batch(conn: Conn, source: str, batch_id: str) -> TrackedBatch | None:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(
            f"SELECT {batch_columns(with_raw=True)} FROM batches WHERE source = %s AND id = %s", (source, batch_id)
        )
        found = await cur.fetchone()
    return None if found is None else Decoder().batch(found, with_raw=True)


async def save_schedule(conn: Conn, rows: Sequence[TrackedBatch]) -> None:
    async with conn.cursor() as cur:
        await cur.executemany(
            "UPDATE batches SET next_due = %s, interval = %s, error_streak = %s WHERE source = %s AND id = %s",
            [(b.next_due, b.interval, b.error_streak, b.source, b.id) for b in rows],
        )


async def prune(conn: Conn, before: float, source: str | None) -> list[TrackedBatch]:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(
            "DELETE FROM batches WHERE state != %s AND finished_at IS NOT NULL AND finished_at < %s"
            f" AND (%s::text IS NULL OR source = %s) RETURNING {batch_columns(with_raw=True)}",
            (ACTIVE, before, source, source),
        )
        decoder = Decoder()
        pruned = [decoder.batch(r, with_raw=True) for r in await cur.fetchall()]
    pruned.sort(key=lambda b: (b.added_at, b.id))
    await conn.execute("DELETE FROM outbox WHERE state = 'delivered' AND updated_at < %s", (before,))
    await conn.execute(
        "DELETE FROM events WHERE detected_at < %s AND NOT EXISTS"
        " (SELECT 1 FROM outbox o WHERE o.event_id = events.id)"
        " AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.source = events.source AND b.id = events.batch_id)",
        (before,),
    )
    return pruned


async def cursor(conn: Conn, source: str, name: str) -> str | None:
    cur = await conn.execute("SELECT value FROM cursors WHERE source = %s AND name = %s", (source, name))
    found = await cur.fetchone()
    return None if found is None else str(found["value"])


async def set_cursor(conn: Conn, source: str, name: str, value: str) -> None:
    await conn.execute(
        "INSERT INTO cursors (source, name, value) VALUES (%s, %s, %s)"
        " ON CONFLICT (source, name) DO UPDATE SET value = excluded.value",
        (source, name, value),
    )
