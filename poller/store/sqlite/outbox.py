"""The per-sink outbox on SQLite: queue heads, acknowledgements, retries, dead letters, redelivery."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from poller.store.base import Delivery, OutboxRow
from poller.store.sqlite._conn import Connection, chunks, marks, padded

#: The heads of a sink's queues that are due, oldest first: an index range scan, no sort (see outbox_heads).
DUE_HEADS_SQL = (
    "SELECT o.sink, o.event_id, o.source, o.batch_id, o.sequence, o.attempts, o.enqueued_at, e.payload"
    " FROM outbox o JOIN events e ON e.id = o.event_id"
    " WHERE o.sink = ? AND o.ready_at IS NOT NULL AND o.ready_at <= ?"
    " ORDER BY o.ready_at, o.enqueued_at LIMIT ?"
)


class OutboxRows:
    conn: Connection

    def claim_heads(self, sink: str, now: float, busy: set[tuple[str, str]], limit: int) -> list[OutboxRow]:
        """The head row of each batch's queue for `sink` that is due and whose batch is not in flight.

        Only a batch's lowest pending sequence is ever a head, so a batch's events go out strictly in
        order. Costs an index range scan of at most `limit + len(busy)` rows, whatever the backlog.
        One process owns a SQLite file's delivery, so claiming is reading.
        """
        rows = self.conn.db.execute(DUE_HEADS_SQL, (sink, now, limit + len(busy)))
        taken: set[tuple[str, str]] = set(busy)
        out: list[OutboxRow] = []
        for r in rows:
            key = (r["source"], r["batch_id"])
            if key in taken:  # one row per batch, none of a batch in flight (each queue has one head)
                continue
            taken.add(key)
            out.append(
                OutboxRow(
                    sink=r["sink"],
                    event_id=r["event_id"],
                    source=r["source"],
                    batch_id=r["batch_id"],
                    sequence=r["sequence"],
                    attempts=r["attempts"],
                    payload=r["payload"].encode(),
                    enqueued_at=r["enqueued_at"],
                )
            )
        return out[:limit]

    def next_ready_at(self, sink: str, busy: set[tuple[str, str]] | None = None) -> float | None:
        """When the earliest head not in flight may be sent; None when every head is in flight or none waits."""
        busy = busy or set()
        rows = self.conn.db.execute(
            "SELECT source, batch_id, ready_at FROM outbox WHERE sink = ? AND ready_at IS NOT NULL"
            " ORDER BY ready_at LIMIT ?",
            (sink, len(busy) + 1),
        )
        for r in rows:
            if (r["source"], r["batch_id"]) not in busy:
                return float(r["ready_at"])
        return None

    @staticmethod
    def _promote(db: sqlite3.Connection, sink: str, source: str, batch_id: str) -> None:
        """Make the lowest pending sequence of a batch the head of its queue (due at its next attempt)."""
        db.execute(
            "UPDATE outbox SET ready_at = next_attempt_at WHERE sink = ? AND event_id = (SELECT event_id FROM"
            " outbox WHERE sink = ? AND source = ? AND batch_id = ? AND state = 'pending'"
            " ORDER BY sequence, enqueued_at LIMIT 1)",
            (sink, sink, source, batch_id),
        )

    def _finish(self, sink: str, event_ids: Sequence[str], state: str, error: str | None, now: float) -> None:
        """Close rows (delivered or dead) and promote each affected batch's next row, in one transaction.

        Two statements per chunk of rows, whatever their number: close them, then make the lowest pending
        sequence of each of their batches its head.
        """
        with self.conn.tx() as db:
            for chunk in map(padded, chunks(list(event_ids))):
                ids = marks(len(chunk))
                db.execute(
                    "UPDATE outbox SET state = ?, attempts = attempts + 1, updated_at = ?, last_error = ?,"
                    " ready_at = NULL WHERE sink = ? AND event_id IN (" + ids + ")",
                    [state, now, error, sink, *chunk],
                )
                db.execute(
                    "UPDATE outbox SET ready_at = next_attempt_at WHERE sink = ? AND event_id IN (SELECT"
                    " (SELECT p.event_id FROM outbox p WHERE p.sink = q.sink AND p.state = 'pending'"
                    " AND p.source = q.source AND p.batch_id = q.batch_id ORDER BY p.sequence, p.enqueued_at LIMIT 1)"
                    " FROM outbox q WHERE q.sink = ? AND q.event_id IN (" + ids + "))",
                    [sink, sink, *chunk],
                )

    def mark_delivered(self, sink: str, event_ids: Sequence[str], now: float) -> None:
        """The sink acknowledged these rows; the next row of each batch becomes its head."""
        self._finish(sink, event_ids, "delivered", None, now)

    def mark_dead(self, sink: str, event_id: str, error: str, now: float) -> None:
        """Dead-letter a row (kept for `deliveries` and `redeliver`); the batch's next row goes ahead."""
        self._finish(sink, [event_id], "dead", error[:500], now)

    def mark_retry(self, sink: str, event_id: str, next_attempt_at: float, error: str, now: float) -> None:
        """A failed attempt: the row stays its batch's head and is due again at `next_attempt_at`."""
        with self.conn.tx() as db:
            # Still the head unless a redelivered earlier row took its place meanwhile: then it waits its turn.
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?,"
                " ready_at = CASE WHEN ready_at IS NULL THEN NULL ELSE ? END, last_error = ?,"
                " updated_at = ? WHERE sink = ? AND event_id = ?",
                (next_attempt_at, next_attempt_at, error[:500], now, sink, event_id),
            )

    def deliveries(self, sink: str | None = None, states: Sequence[str] = ("pending", "dead")) -> list[Delivery]:
        sql = (
            "SELECT o.sink, o.event_id, o.batch_id, e.type, o.sequence, o.state, o.attempts, o.next_attempt_at,"
            " o.last_error FROM outbox o JOIN events e ON e.id = o.event_id WHERE o.state IN ("
            + marks(len(states))
            + ")"
        )
        args: list[Any] = list(states)
        if sink is not None:
            sql += " AND o.sink = ?"
            args.append(sink)
        rows = self.conn.db.execute(sql + " ORDER BY o.sink, o.enqueued_at, o.sequence", args)
        return [Delivery(*tuple(r)) for r in rows]

    def redeliver(self, sink: str | None, event_id: str | None, now: float) -> int:
        """Put dead (or, for one named event, delivered) rows back in the queue; returns how many.

        A re-queued row goes back into its batch's sequence order, ahead of anything later still pending.
        """
        where = "event_id = ? AND state IN ('dead', 'delivered')" if event_id is not None else "state = 'dead'"
        args: list[Any] = [event_id] if event_id is not None else []
        if sink is not None:
            where += " AND sink = ?"
            args.append(sink)
        with self.conn.tx() as db:
            queues = db.execute("SELECT DISTINCT sink, source, batch_id FROM outbox WHERE " + where, args).fetchall()
            count = db.execute(
                "UPDATE outbox SET state = 'pending', next_attempt_at = 0, updated_at = ?, attempts = 0 WHERE " + where,
                [now, *args],
            ).rowcount
            for q in queues:
                db.execute(
                    "UPDATE outbox SET ready_at = NULL WHERE sink = ? AND source = ? AND batch_id = ?",
                    (q["sink"], q["source"], q["batch_id"]),
                )
                self._promote(db, q["sink"], q["source"], q["batch_id"])
        return count

    def outbox_stats(self) -> dict[str, dict[str, Any]]:
        """Per sink: pending and dead counts and the oldest pending row's enqueue time."""
        stats: dict[str, dict[str, Any]] = {}
        for r in self.conn.db.execute(
            "SELECT sink, state, COUNT(*), MIN(enqueued_at) FROM outbox WHERE state != 'delivered' GROUP BY sink, state"
        ):
            entry = stats.setdefault(r[0], {"pending": 0, "dead": 0, "oldest_pending": None})
            entry[r[1]] = r[2]
            if r[1] == "pending":
                entry["oldest_pending"] = r[3]
        return stats
