"""Tracked batches and cursors, on the SQLite connection (synchronous; the store runs it in its thread)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from poller.domain.lifecycle import RANK
from poller.domain.transitions import Knowledge
from poller.store.base import ACTIVE, GONE, TrackedBatch
from poller.store.codec import Decoder, batch_columns, knowledge_to_json, no_collection
from poller.store.sqlite._conn import Connection, chunks, marks, padded


class BatchRows:
    conn: Connection

    def track(self, source: str, ids: Iterable[str], origin: str, now: float) -> list[str]:
        added = []
        with self.conn.tx() as db:
            for batch_id in ids:
                cur = db.execute(
                    "INSERT OR IGNORE INTO batches (source, id, origin, added_at, next_due) VALUES (?, ?, ?, ?, 0)",
                    (source, batch_id, origin, now),
                )
                if not cur.rowcount:
                    revived = db.execute(
                        "UPDATE batches SET state = ?, not_found = 0, error_streak = 0, next_due = 0,"
                        " finished_at = NULL WHERE source = ? AND id = ? AND state = ?",
                        (ACTIVE, source, batch_id, GONE),
                    )
                    if revived.rowcount:
                        added.append(batch_id)
                    continue
                added.append(batch_id)
                db.execute("DELETE FROM untracked WHERE source = ? AND id = ?", (source, batch_id))
                self._resume(db, source, batch_id)
        return added

    @staticmethod
    def _resume(db: sqlite3.Connection, source: str, batch_id: str) -> None:
        """A batch tracked before resumes its recorded sequence and the statuses it announced."""
        history = db.execute(
            "SELECT type, sequence FROM events WHERE source = ? AND batch_id = ?", (source, batch_id)
        ).fetchall()
        if not history:
            return
        known = Knowledge(
            sequence=max(r["sequence"] for r in history),
            seen=frozenset(r["type"].removeprefix("batch.") for r in history) & RANK.keys(),
        )
        db.execute(
            "UPDATE batches SET knowledge = ?, sequence = ? WHERE source = ? AND id = ?",
            (knowledge_to_json(known), known.sequence, source, batch_id),
        )

    def untrack(self, source: str, ids: Iterable[str], now: float) -> list[str]:
        removed: list[str] = []
        with self.conn.tx() as db:
            for batch_id in ids:
                if db.execute("DELETE FROM batches WHERE source = ? AND id = ?", (source, batch_id)).rowcount:
                    removed.append(batch_id)
                    db.execute(
                        "INSERT OR REPLACE INTO untracked (source, id, at) VALUES (?, ?, ?)", (source, batch_id, now)
                    )
        return removed

    def untracked(self, source: str, ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        for chunk in map(padded, chunks(list(ids))):
            rows = self.conn.db.execute(
                "SELECT id FROM untracked WHERE source = ? AND id IN (" + marks(len(chunk)) + ")", [source, *chunk]
            )
            found.update(r[0] for r in rows)
        return found

    def batches(
        self, source: str | None = None, states: Sequence[str] | None = None, *, with_raw: bool = False
    ) -> list[TrackedBatch]:
        sql = f"SELECT {batch_columns(with_raw=with_raw)} FROM batches"
        clauses, args = [], []
        if source is not None:
            clauses.append("source = ?")
            args.append(source)
        if states:
            clauses.append(f"state IN ({marks(len(states))})")
            args.extend(states)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        cur = self.conn.db.cursor()
        cur.row_factory = None  # plain tuples: a large tracked set loads at start-up, before READY
        decoder = Decoder()
        with no_collection():
            return [decoder.batch(row, with_raw=with_raw) for row in cur.execute(sql + " ORDER BY added_at, id", args)]

    def batch(self, source: str, batch_id: str) -> TrackedBatch | None:
        cur = self.conn.db.cursor()
        cur.row_factory = None
        row = cur.execute(
            f"SELECT {batch_columns(with_raw=True)} FROM batches WHERE source = ? AND id = ?", (source, batch_id)
        ).fetchone()
        return None if row is None else Decoder().batch(row, with_raw=True)

    def save_schedule(self, batches: Iterable[TrackedBatch]) -> None:
        with self.conn.tx() as db:
            db.executemany(
                "UPDATE batches SET next_due = ?, interval = ?, error_streak = ? WHERE source = ? AND id = ?",
                [(b.next_due, b.interval, b.error_streak, b.source, b.id) for b in batches],
            )

    def prune(self, before: float, source: str | None = None) -> list[TrackedBatch]:
        with self.conn.tx() as db:
            sql = (
                f"SELECT {batch_columns(with_raw=True)} FROM batches"
                " WHERE state != ? AND finished_at IS NOT NULL AND finished_at < ?"
            )
            args: list[Any] = [ACTIVE, before]
            if source is not None:
                sql += " AND source = ?"
                args.append(source)
            cur = db.cursor()
            cur.row_factory = None
            decoder = Decoder()
            pruned = [decoder.batch(r, with_raw=True) for r in cur.execute(sql, args).fetchall()]
            db.executemany("DELETE FROM batches WHERE source = ? AND id = ?", [(b.source, b.id) for b in pruned])
            db.execute("DELETE FROM outbox WHERE state = 'delivered' AND updated_at < ?", (before,))
            db.execute(
                "DELETE FROM events WHERE detected_at < ? AND NOT EXISTS"
                " (SELECT 1 FROM outbox o WHERE o.event_id = events.id)"
                " AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.source = events.source AND b.id = events.batch_id)",
                (before,),
            )
        return pruned

    def cursor(self, source: str, name: str) -> str | None:
        row = self.conn.db.execute("SELECT value FROM cursors WHERE source = ? AND name = ?", (source, name)).fetchone()
        return None if row is None else str(row[0])

    def set_cursor(self, source: str, name: str, value: str) -> None:
        with self.conn.tx() as db:
            db.execute(
                "INSERT INTO cursors (source, name, value) VALUES (?, ?, ?)"
                " ON CONFLICT (source, name) DO UPDATE SET value = excluded.value",
                (source, name, value),
            )
