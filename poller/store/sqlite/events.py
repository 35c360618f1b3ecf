"""Recording: batch rows, the event log and the outbox rows of new events, in one SQLite transaction."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from poller.store.base import LoggedEvent, NewEvent, OutboxRow, Recorded, Write
from poller.store.codec import fingerprint, knowledge_to_json
from poller.store.sqlite._conn import Connection, marks

_UPDATE = (
    "UPDATE batches SET state = ?, status = ?, created_at = ?, snapshot = COALESCE(?, snapshot),"
    " fingerprint = COALESCE(?, fingerprint), knowledge = ?,"
    " sequence = ?, next_due = ?, interval = ?, error_streak = ?, not_found = ?, updated_at = ?, finished_at = ?"
    " WHERE source = ? AND id = ?"
)


class EventRows:
    conn: Connection

    def record(self, writes: Sequence[Write], now: float) -> Recorded:
        enqueued = 0
        conflicts: list[tuple[str, str]] = []
        heads: list[OutboxRow] = []
        with self.conn.tx() as db:
            for write in writes:
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
                sql = _UPDATE
                if write.expected_sequence is not None:
                    sql += " AND sequence = ?"
                    args.append(write.expected_sequence)
                if not db.execute(sql, args).rowcount:
                    if write.expected_sequence is not None and _exists(db, b.source, b.id):
                        conflicts.append(b.key)
                    continue  # untracked meanwhile: its events go with it
                enqueued += _insert_events(db, b.source, b.id, write.events, now, heads=heads)
            position = _last_position(db)
        return Recorded(enqueued, tuple(conflicts), position, tuple(heads))

    def record_orphan(self, source: str, batch_id: str, event: NewEvent, now: float) -> int:
        with self.conn.tx() as db:
            return _insert_events(db, source, batch_id, [event], now, heads=[])

    def events_for(self, source: str | None, batch_id: str) -> list[dict[str, Any]]:
        sql = "SELECT payload FROM events WHERE batch_id = ?"
        args: list[Any] = [batch_id]
        if source is not None:
            sql += " AND source = ?"
            args.append(source)
        return [json.loads(r[0]) for r in self.conn.db.execute(sql + " ORDER BY sequence, pos", args)]

    def read_events(
        self,
        after: int,
        limit: int,
        *,
        sources: Sequence[str] = (),
        batch_ids: Sequence[str] = (),
        types: Sequence[str] = (),
    ) -> list[LoggedEvent]:
        sql = "SELECT pos, source, batch_id, type, payload FROM events WHERE pos > ?"
        args: list[Any] = [after]
        for column, values in (("source", sources), ("batch_id", batch_ids), ("type", types)):
            if values:
                sql += f" AND {column} IN ({marks(len(values))})"
                args.extend(values)
        rows = self.conn.db.execute(sql + " ORDER BY pos LIMIT ?", [*args, limit])
        return [LoggedEvent(r[0], r[1], r[2], r[3], r[4].encode()) for r in rows]

    def last_position(self) -> int:
        return _last_position(self.conn.db)


def _exists(db: sqlite3.Connection, source: str, batch_id: str) -> bool:
    return db.execute("SELECT 1 FROM batches WHERE source = ? AND id = ?", (source, batch_id)).fetchone() is not None


def _last_position(db: sqlite3.Connection) -> int:
    # AUTOINCREMENT keeps its high-water mark in sqlite_sequence, so pruning never makes positions repeat.
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    return int(row[0]) if row else 0


def _insert_events(
    db: sqlite3.Connection,
    source: str,
    batch_id: str,
    events: Sequence[NewEvent],
    now: float,
    *,
    heads: list[OutboxRow],
) -> int:
    """Insert events and their outbox rows; appends to `heads` the rows that head their batch's queue."""
    enqueued = 0
    for ev in events:
        cur = db.execute(
            "INSERT OR IGNORE INTO events (id, source, batch_id, sequence, type, created_at, detected_at, payload)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (ev.id, source, batch_id, ev.sequence, ev.type, ev.created_at, ev.detected_at, ev.payload.decode()),
        )
        if not cur.rowcount:
            continue  # recorded before: never enqueue the same event twice
        for sink in ev.sinks:
            # The new row heads its batch's queue only if nothing of that batch is pending for the sink.
            waiting = db.execute(
                "SELECT 1 FROM outbox WHERE sink = ? AND source = ? AND batch_id = ? AND state = 'pending' LIMIT 1",
                (sink, source, batch_id),
            ).fetchone()
            inserted = db.execute(
                "INSERT OR IGNORE INTO outbox (sink, event_id, source, batch_id, sequence, enqueued_at, ready_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sink, ev.id, source, batch_id, ev.sequence, now, None if waiting else 0),
            ).rowcount
            if inserted and not waiting:
                heads.append(OutboxRow(sink, ev.id, source, batch_id, ev.sequence, 0, ev.payload, now))
        enqueued += len(ev.sinks)
    return enqueued
