"""The durable state: tracked batches, recorded events and the per-sink outbox, in one SQLite file (WAL).

A status update and the outbox rows of its events are written in one transaction, so a crash at any
moment either keeps both or neither; the next poll then re-detects the same transitions under the same
deterministic ids. Outbox rows are marked delivered only after a sink acknowledged them.

One `Store` is used from one thread; other processes (the CLI) may open the same file concurrently.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from poller.errors import ConfigError
from poller.models import KNOWN_STATUSES
from poller.records import ACTIVE, NewEvent, TrackedBatch
from poller.transitions import Knowledge

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    origin TEXT NOT NULL,
    added_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    status TEXT,
    created_at INTEGER,
    snapshot TEXT,
    knowledge TEXT NOT NULL DEFAULT '{}',
    next_due REAL NOT NULL DEFAULT 0,
    interval REAL,
    error_streak INTEGER NOT NULL DEFAULT 0,
    not_found INTEGER NOT NULL DEFAULT 0,
    updated_at REAL,
    finished_at REAL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    type TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    detected_at REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_batch ON events (source, batch_id, sequence);
CREATE TABLE IF NOT EXISTS outbox (
    sink TEXT NOT NULL,
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at REAL,
    -- Set only on the head of a batch's queue (its lowest pending sequence): when it may be sent next.
    ready_at REAL,
    PRIMARY KEY (sink, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_queue ON outbox (sink, state, source, batch_id, sequence);
DROP INDEX IF EXISTS outbox_ready;
CREATE INDEX IF NOT EXISTS outbox_heads ON outbox (sink, ready_at, enqueued_at) WHERE ready_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS untracked (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
"""


#: The heads of a sink's queues that are due, oldest first: an index range scan, no sort (see outbox_heads).
DUE_HEADS_SQL = (
    "SELECT o.sink, o.event_id, o.source, o.batch_id, o.sequence, o.attempts, o.enqueued_at, e.payload"
    " FROM outbox o JOIN events e ON e.id = o.event_id"
    " WHERE o.sink = ? AND o.ready_at IS NOT NULL AND o.ready_at <= ?"
    " ORDER BY o.ready_at, o.enqueued_at LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    sink: str
    event_id: str
    source: str
    batch_id: str
    sequence: int
    attempts: int
    payload: bytes
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """An outbox row as `deliveries` lists it."""

    sink: str
    event_id: str
    batch_id: str
    type: str
    sequence: int
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None


def _knowledge_to_json(k: Knowledge) -> str:
    return json.dumps(
        {
            "status": k.status,
            "seen": sorted(k.seen),
            "sequence": k.sequence,
            "counts": k.counts,
            "counts_changed_at": k.counts_changed_at,
            "progress_counts": k.progress_counts,
            "progress_at": k.progress_at,
            "stalled_at_counts": k.stalled_at_counts,
            "expiring_sent": k.expiring_sent,
        },
        separators=(",", ":"),
    )


def _counts(value: Any) -> tuple[int, int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]), int(value[2]))


def _knowledge_from_json(text: str) -> Knowledge:
    raw = json.loads(text or "{}")
    return Knowledge(
        status=raw.get("status"),
        seen=frozenset(raw.get("seen", ())),
        sequence=int(raw.get("sequence", 0)),
        counts=_counts(raw.get("counts")),
        counts_changed_at=raw.get("counts_changed_at"),
        progress_counts=_counts(raw.get("progress_counts")),
        progress_at=raw.get("progress_at"),
        stalled_at_counts=_counts(raw.get("stalled_at_counts")),
        expiring_sent=bool(raw.get("expiring_sent", False)),
    )


class Store:
    """SQLite state. Every write method commits before it returns."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        uri = path.absolute().as_uri() + ("?mode=ro" if readonly else "")
        self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            self._db.execute("PRAGMA journal_mode = WAL")
            # WAL with synchronous=NORMAL survives any process crash; a power cut may lose the last
            # commits, which the next poll re-detects under the same event ids.
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._check_schema()
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")

    def _check_schema(self) -> None:
        """Refuse a state file written by another schema version rather than misread it."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        used = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'").fetchone()
        if used and version != SCHEMA_VERSION:
            self._db.close()
            raise ConfigError(
                "state.path",
                f"{self.path} has state schema version {version}; this batch-poller reads version {SCHEMA_VERSION}",
                "run the batch-poller version that wrote it until its outbox is drained, then move the file aside",
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def data_version(self) -> int:
        """Changes when another connection (the CLI) committed; cheap enough to ask every second."""
        row = self._db.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    # -- tracked batches -------------------------------------------------------------------------

    def track(self, source: str, ids: Iterable[str], origin: str, now: float) -> list[str]:
        """Start tracking ids not tracked yet; returns the ids that were added.

        A batch tracked before (then untracked or pruned) resumes where its recorded events end, so its
        `sequence` keeps increasing and no status it already announced is announced again.
        """
        added = []
        with self._tx() as db:
            for batch_id in ids:
                cur = db.execute(
                    "INSERT OR IGNORE INTO batches (source, id, origin, added_at, next_due) VALUES (?, ?, ?, ?, 0)",
                    (source, batch_id, origin, now),
                )
                if not cur.rowcount:
                    continue
                added.append(batch_id)
                db.execute("DELETE FROM untracked WHERE source = ? AND id = ?", (source, batch_id))
                history = db.execute(
                    "SELECT type, sequence FROM events WHERE source = ? AND batch_id = ?", (source, batch_id)
                ).fetchall()
                if history:
                    known = Knowledge(
                        sequence=max(r["sequence"] for r in history),
                        seen=frozenset(r["type"].removeprefix("batch.") for r in history) & KNOWN_STATUSES,
                    )
                    db.execute(
                        "UPDATE batches SET knowledge = ? WHERE source = ? AND id = ?",
                        (_knowledge_to_json(known), source, batch_id),
                    )
        return added

    def untrack(self, source: str, ids: Iterable[str], now: float = 0.0) -> list[str]:
        """Stop tracking; recorded events and pending deliveries stay, and discovery will not re-adopt them."""
        removed: list[str] = []
        with self._tx() as db:
            for batch_id in ids:
                if db.execute("DELETE FROM batches WHERE source = ? AND id = ?", (source, batch_id)).rowcount:
                    removed.append(batch_id)
                    db.execute(
                        "INSERT OR REPLACE INTO untracked (source, id, at) VALUES (?, ?, ?)", (source, batch_id, now)
                    )
        return removed

    def untracked(self, source: str, ids: Iterable[str]) -> set[str]:
        """Which of `ids` a user untracked (discovery leaves those alone until tracked again by hand)."""
        wanted = list(ids)
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT id FROM untracked WHERE source = ? AND id IN (" + marks + ")", [source, *chunk]
            )
            found.update(r[0] for r in rows)
        return found

    def batches(self, source: str | None = None, states: Sequence[str] | None = None) -> list[TrackedBatch]:
        sql = "SELECT * FROM batches"
        clauses, args = [], []
        if source is not None:
            clauses.append("source = ?")
            args.append(source)
        if states:
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        return [self._row_to_batch(row) for row in self._db.execute(sql + " ORDER BY added_at, id", args)]

    def batch(self, source: str, batch_id: str) -> TrackedBatch | None:
        row = self._db.execute("SELECT * FROM batches WHERE source = ? AND id = ?", (source, batch_id)).fetchone()
        return None if row is None else self._row_to_batch(row)

    @staticmethod
    def _row_to_batch(row: sqlite3.Row) -> TrackedBatch:
        return TrackedBatch(
            source=row["source"],
            id=row["id"],
            origin=row["origin"],
            added_at=row["added_at"],
            state=row["state"],
            knowledge=_knowledge_from_json(row["knowledge"]),
            created_at=row["created_at"],
            snapshot=json.loads(row["snapshot"]) if row["snapshot"] else None,
            next_due=row["next_due"],
            interval=row["interval"],
            error_streak=row["error_streak"],
            not_found=row["not_found"],
            updated_at=row["updated_at"],
            finished_at=row["finished_at"],
        )

    def save(self, updates: Sequence[tuple[TrackedBatch, Sequence[NewEvent]]], now: float) -> int:
        """Write batch rows and their new events with outbox rows, all in one transaction.

        Returns how many outbox rows were enqueued. A batch row untracked meanwhile (by the CLI) is not
        recreated, and its events are dropped with it.
        """
        enqueued = 0
        with self._tx() as db:
            for batch, events in updates:
                cur = db.execute(
                    "UPDATE batches SET state = ?, status = ?, created_at = ?, snapshot = ?, knowledge = ?,"
                    " next_due = ?, interval = ?, error_streak = ?, not_found = ?, updated_at = ?, finished_at = ?"
                    " WHERE source = ? AND id = ?",
                    (
                        batch.state,
                        batch.knowledge.status,
                        batch.created_at,
                        json.dumps(batch.snapshot, separators=(",", ":")) if batch.snapshot is not None else None,
                        _knowledge_to_json(batch.knowledge),
                        batch.next_due,
                        batch.interval,
                        batch.error_streak,
                        batch.not_found,
                        batch.updated_at,
                        batch.finished_at,
                        batch.source,
                        batch.id,
                    ),
                )
                if not cur.rowcount:
                    continue
                enqueued += self._insert_events(db, batch.source, batch.id, events, now)
        return enqueued

    @staticmethod
    def _insert_events(
        db: sqlite3.Connection, source: str, batch_id: str, events: Sequence[NewEvent], now: float
    ) -> int:
        enqueued = 0
        for ev in events:
            cur = db.execute(
                "INSERT OR IGNORE INTO events (id, source, batch_id, sequence, type, created_at, detected_at, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (ev.id, source, batch_id, ev.sequence, ev.type, ev.created_at, ev.detected_at, ev.payload.decode()),
            )
            if not cur.rowcount:
                continue  # recorded before: never enqueue the same event twice
            # The new row heads its batch's queue only if nothing of that batch is pending for the sink.
            db.executemany(
                "INSERT OR IGNORE INTO outbox (sink, event_id, source, batch_id, sequence, enqueued_at, ready_at)"
                " VALUES (?, ?, ?, ?, ?, ?, CASE WHEN EXISTS (SELECT 1 FROM outbox WHERE sink = ? AND source = ?"
                " AND batch_id = ? AND state = 'pending') THEN NULL ELSE 0 END)",
                [(sink, ev.id, source, batch_id, ev.sequence, now, sink, source, batch_id) for sink in ev.sinks],
            )
            enqueued += len(ev.sinks)
        return enqueued

    def save_schedule(self, batches: Iterable[TrackedBatch]) -> None:
        """Persist only the schedule fields (on shutdown), so a restart keeps each batch's pace."""
        with self._tx() as db:
            db.executemany(
                "UPDATE batches SET next_due = ?, interval = ?, error_streak = ? WHERE source = ? AND id = ?",
                [(b.next_due, b.interval, b.error_streak, b.source, b.id) for b in batches],
            )

    def prune(self, before: float) -> list[TrackedBatch]:
        """Forget final and gone batches that finished before `before`; returns them.

        Delivered outbox rows and events of pruned batches go too, once no sink still needs them.
        """
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM batches WHERE state != ? AND finished_at IS NOT NULL AND finished_at < ?",
                (ACTIVE, before),
            ).fetchall()
            pruned = [self._row_to_batch(r) for r in rows]
            db.executemany("DELETE FROM batches WHERE source = ? AND id = ?", [(b.source, b.id) for b in pruned])
            db.execute("DELETE FROM outbox WHERE state = 'delivered' AND updated_at < ?", (before,))
            db.execute(
                "DELETE FROM events WHERE detected_at < ? AND NOT EXISTS"
                " (SELECT 1 FROM outbox o WHERE o.event_id = events.id)"
                " AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.source = events.source AND b.id = events.batch_id)",
                (before,),
            )
        return pruned

    def record_internal(self, source: str, batch_id: str, event: NewEvent, now: float) -> int:
        """Record an event for a batch that may no longer have a row (the prune notice)."""
        with self._tx() as db:
            return self._insert_events(db, source, batch_id, [event], now)

    # -- events ----------------------------------------------------------------------------------

    def events_for(self, source: str | None, batch_id: str) -> list[dict[str, Any]]:
        sql = "SELECT payload FROM events WHERE batch_id = ?"
        args: list[Any] = [batch_id]
        if source is not None:
            sql += " AND source = ?"
            args.append(source)
        return [json.loads(r[0]) for r in self._db.execute(sql + " ORDER BY sequence", args)]

    # -- outbox ----------------------------------------------------------------------------------

    def due_heads(self, sink: str, now: float, busy: set[tuple[str, str]], limit: int) -> list[OutboxRow]:
        """The head row of each batch's queue for `sink` that is due and whose batch is not in flight.

        Only a batch's lowest pending sequence is ever a head, so a batch's events go out strictly in
        order. Costs an index range scan of at most `limit + len(busy)` rows, whatever the backlog.
        """
        rows = self._db.execute(DUE_HEADS_SQL, (sink, now, limit + len(busy)))
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
        rows = self._db.execute(
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
        """Close rows (delivered or dead) and promote each affected batch's next row, in one transaction."""
        with self._tx() as db:
            queues: set[tuple[str, str]] = set()
            for start in range(0, len(event_ids), 500):
                chunk = list(event_ids[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    "SELECT source, batch_id FROM outbox WHERE sink = ? AND event_id IN (" + marks + ")", [sink, *chunk]
                )
                queues.update((r["source"], r["batch_id"]) for r in rows)
            db.executemany(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, updated_at = ?, last_error = ?,"
                " ready_at = NULL WHERE sink = ? AND event_id = ?",
                [(state, now, error, sink, event_id) for event_id in event_ids],
            )
            for source, batch_id in queues:
                self._promote(db, sink, source, batch_id)

    def mark_delivered(self, sink: str, event_ids: Sequence[str], now: float) -> None:
        """The sink acknowledged these rows; the next row of each batch becomes its head."""
        self._finish(sink, event_ids, "delivered", None, now)

    def mark_dead(self, sink: str, event_id: str, error: str, now: float) -> None:
        """Dead-letter a row (kept for `deliveries` and `redeliver`); the batch's next row goes ahead."""
        self._finish(sink, [event_id], "dead", error[:500], now)

    def mark_retry(self, sink: str, event_id: str, next_attempt_at: float, error: str, now: float) -> None:
        """A failed attempt: the row stays its batch's head and is due again at `next_attempt_at`."""
        with self._tx() as db:
            # Still the head unless a redelivered earlier row took its place meanwhile: then it waits its turn.
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?,"
                " ready_at = CASE WHEN ready_at IS NULL THEN NULL ELSE ? END, last_error = ?,"
                " updated_at = ? WHERE sink = ? AND event_id = ?",
                (next_attempt_at, next_attempt_at, error[:500], now, sink, event_id),
            )

    def deliveries(self, sink: str | None = None, states: Sequence[str] = ("pending", "dead")) -> list[Delivery]:
        marks = ",".join("?" * len(states))
        sql = (
            "SELECT o.sink, o.event_id, o.batch_id, e.type, o.sequence, o.state, o.attempts, o.next_attempt_at,"
            " o.last_error FROM outbox o JOIN events e ON e.id = o.event_id WHERE o.state IN (" + marks + ")"
        )
        args: list[Any] = list(states)
        if sink is not None:
            sql += " AND o.sink = ?"
            args.append(sink)
        rows = self._db.execute(sql + " ORDER BY o.sink, o.enqueued_at, o.sequence", args)
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
        with self._tx() as db:
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
        for r in self._db.execute(
            "SELECT sink, state, COUNT(*), MIN(enqueued_at) FROM outbox WHERE state != 'delivered' GROUP BY sink, state"
        ):
            entry = stats.setdefault(r[0], {"pending": 0, "dead": 0, "oldest_pending": None})
            entry[r[1]] = r[2]
            if r[1] == "pending":
                entry["oldest_pending"] = r[3]
        return stats
