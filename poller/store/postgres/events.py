"""The event log on PostgreSQL: batch rows with compare-and-set, events, their outbox rows.

Positions come from the one `event_log` row, locked first by every transaction that adds events: event
writers take turns (no deadlock between them), and positions commit in increasing order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from poller.store.base import LoggedEvent, NewEvent, Recorded, Write
from poller.store.codec import fingerprint, knowledge_to_json
from poller.store.postgres.batches import Conn

_UPDATE = (
    "UPDATE batches SET state = %s, status = %s, created_at = %s, snapshot = COALESCE(%s, snapshot),"
    " fingerprint = COALESCE(%s, fingerprint),"
    " knowledge = %s, sequence = %s, next_due = %s, interval = %s, error_streak = %s, not_found = %s,"
    " updated_at = %s, finished_at = %s WHERE source = %s AND id = %s"
)
_COMPARE = " AND sequence = %s"


async def record(conn: Conn, writes: Sequence[Write], now: float) -> Recorded:
    # Decode every payload before anything is written: a bad one fails the call with nothing locked.
    payloads = [[ev.payload.decode() for ev in w.events] for w in writes]
    adds_events = any(w.events for w in writes)
    position = await (_lock_log(conn) if adds_events else last_position(conn))
    enqueued = 0
    conflicts: list[tuple[str, str]] = []
    for write, texts in zip(writes, payloads, strict=True):
        b, k = write.batch, write.batch.knowledge
        args: list[Any] = [
            b.state,
            k.status,
            b.created_at,
            write.body,
            None if write.body is None else fingerprint(write.body),
            knowledge_to_json(k),
            k.sequence,
            b.next_due,
            b.interval,
            b.error_streak,
            b.not_found,
            b.updated_at,
            b.finished_at,
            b.source,
            b.id,
        ]
        if write.expected_sequence is not None:
            cur = await conn.execute(_UPDATE + _COMPARE, [*args, write.expected_sequence])
        else:
            cur = await conn.execute(_UPDATE, args)
        if not cur.rowcount:
            if write.expected_sequence is not None and await _exists(conn, b.source, b.id):
                conflicts.append(b.key)
            continue  # untracked meanwhile: its events go with it
        added, position = await _insert_events(
            conn, b.source, b.id, write.events, texts=texts, now=now, position=position
        )
        enqueued += added
    if adds_events:
        await conn.execute("UPDATE event_log SET last = %s WHERE id = 1", (position,))
    return Recorded(enqueued, tuple(conflicts), position)


async def record_orphan(conn: Conn, source: str, batch_id: str, event: NewEvent, now: float) -> int:
    text = event.payload.decode()
    position = await _lock_log(conn)
    added, position = await _insert_events(conn, source, batch_id, [event], texts=[text], now=now, position=position)
    await conn.execute("UPDATE event_log SET last = %s WHERE id = 1", (position,))
    return added


async def events_for(conn: Conn, source: str | None, batch_id: str) -> list[dict[str, Any]]:
    cur = await conn.execute(
        "SELECT payload FROM events WHERE batch_id = %s AND (%s::text IS NULL OR source = %s) ORDER BY sequence, pos",
        (batch_id, source, source),
    )
    return [json.loads(r["payload"]) for r in await cur.fetchall()]


async def read_events(
    conn: Conn, after: int, limit: int, *, sources: Sequence[str], batch_ids: Sequence[str], types: Sequence[str]
) -> list[LoggedEvent]:
    cur = await conn.execute(
        "SELECT pos, source, batch_id, type, payload FROM events WHERE pos > %(after)s"
        " AND (%(sources)s::text[] IS NULL OR source = ANY(%(sources)s))"
        " AND (%(batch_ids)s::text[] IS NULL OR batch_id = ANY(%(batch_ids)s))"
        " AND (%(types)s::text[] IS NULL OR type = ANY(%(types)s)) ORDER BY pos LIMIT %(limit)s",
        {
            "after": after,
            "limit": limit,
            "sources": list(sources) or None,
            "batch_ids": list(batch_ids) or None,
            "types": list(types) or None,
        },
    )
    return [
        LoggedEvent(int(r["pos"]), r["source"], r["batch_id"], r["type"], str(r["payload"]).encode())
        for r in await cur.fetchall()
    ]


async def last_position(conn: Conn) -> int:
    # The counter, not max(pos): pruning never makes positions repeat.
    cur = await conn.execute("SELECT last FROM event_log WHERE id = 1")
    found = await cur.fetchone()
    return int(found["last"]) if found else 0


async def _lock_log(conn: Conn) -> int:
    cur = await conn.execute("SELECT last FROM event_log WHERE id = 1 FOR UPDATE")
    found = await cur.fetchone()
    return int(found["last"]) if found else 0


async def _exists(conn: Conn, source: str, batch_id: str) -> bool:
    cur = await conn.execute("SELECT 1 AS one FROM batches WHERE source = %s AND id = %s", (source, batch_id))
    return await cur.fetchone() is not None


async def _insert_events(
    conn: Conn,
    source: str,
    batch_id: str,
    events: Sequence[NewEvent],
    *,
    texts: Sequence[str],
    now: float,
    position: int,
) -> tuple[int, int]:
    """Insert new events at the next positions with their outbox rows; returns (rows enqueued, position)."""
    enqueued = 0
    for ev, text in zip(events, texts, strict=True):
        # The log's row lock is held, so this sees every committed event: no position is wasted.
        cur = await conn.execute(
            "INSERT INTO events (pos, id, source, batch_id, sequence, type, created_at, detected_at, payload)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (position + 1, ev.id, source, batch_id, ev.sequence, ev.type, ev.created_at, ev.detected_at, text),
        )
        if not cur.rowcount:
            continue  # recorded before: never enqueue the same event twice
        position += 1
        for sink in ev.sinks:
            # The new row heads its batch's queue only if nothing of that batch is pending for the sink.
            await conn.execute(
                "INSERT INTO outbox (sink, event_id, source, batch_id, sequence, enqueued_at, ready_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, CASE WHEN EXISTS (SELECT 1 FROM outbox WHERE sink = %s"
                " AND source = %s AND batch_id = %s AND state = 'pending') THEN NULL ELSE 0 END)"
                " ON CONFLICT (sink, event_id) DO NOTHING",
                (sink, ev.id, source, batch_id, ev.sequence, now, sink, source, batch_id),
            )
        enqueued += len(ev.sinks)
    return enqueued, position
