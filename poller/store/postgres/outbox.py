"""The per-sink outbox on PostgreSQL: claimed heads (shared by replicas), acknowledgements, retries,
dead letters, redelivery. Each function runs inside the caller's transaction.

Only a batch's lowest pending sequence is ever a head, and a head is claimed by one replica (its name
and a deadline) with `FOR UPDATE SKIP LOCKED`, so a batch's events go out in order whichever replica
sends them. A replica that dies holding a claim loses it at `claimed_until`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from poller.store.base import Delivery, OutboxRow
from poller.store.postgres.batches import Conn, bump_revision

#: How long a claimed head stays with its replica before another may take it over (the store's default:
#: twice `[state] lease_ttl`; longer than a send may take, so a slow send is rarely duplicated).
CLAIM_TTL = 60.0

_CLAIM = (
    "SELECT o.sink, o.event_id, o.source, o.batch_id, o.sequence, o.attempts, o.enqueued_at, e.payload"
    " FROM outbox o JOIN events e ON e.id = o.event_id"
    " WHERE o.sink = %(sink)s AND o.ready_at IS NOT NULL AND o.ready_at <= %(now)s"
    " AND (o.claimed_by IS NULL OR o.claimed_by = %(me)s OR o.claimed_until <= %(now)s)"
    " AND NOT EXISTS (SELECT 1 FROM unnest(%(bs)s::text[], %(bb)s::text[]) AS busy (source, batch_id)"
    " WHERE busy.source = o.source AND busy.batch_id = o.batch_id)"
    " ORDER BY o.ready_at, o.enqueued_at, o.event_id LIMIT %(limit)s FOR UPDATE OF o SKIP LOCKED"
)


def _busy(busy: set[tuple[str, str]]) -> dict[str, list[str]]:
    pairs = sorted(busy)
    return {"bs": [s for s, _ in pairs], "bb": [b for _, b in pairs]}


async def claim_heads(
    conn: Conn, me: str, sink: str, *, now: float, busy: set[tuple[str, str]], limit: int, ttl: float = CLAIM_TTL
) -> list[OutboxRow]:
    cur = await conn.execute(_CLAIM, {"sink": sink, "now": now, "me": me, "limit": limit, **_busy(busy)})
    taken: set[tuple[str, str]] = set()
    out: list[OutboxRow] = []
    for r in await cur.fetchall():
        key = (r["source"], r["batch_id"])
        if key in taken:  # each queue has one head; never hand out two rows of one batch
            continue
        taken.add(key)
        out.append(
            OutboxRow(
                sink=r["sink"],
                event_id=r["event_id"],
                source=r["source"],
                batch_id=r["batch_id"],
                sequence=int(r["sequence"]),
                attempts=int(r["attempts"]),
                payload=str(r["payload"]).encode(),
                enqueued_at=float(r["enqueued_at"]),
            )
        )
    if out:
        await conn.execute(
            "UPDATE outbox SET claimed_by = %s, claimed_until = %s WHERE sink = %s AND event_id = ANY(%s)",
            (me, now + ttl, sink, [r.event_id for r in out]),
        )
    return out


async def next_ready_at(conn: Conn, me: str, sink: str, busy: set[tuple[str, str]]) -> float | None:
    # Another replica's live claim holds a head back until the claim runs out.
    cur = await conn.execute(
        "SELECT min(CASE WHEN o.claimed_by IS NOT NULL AND o.claimed_by != %(me)s"
        " THEN greatest(o.ready_at, o.claimed_until) ELSE o.ready_at END) AS at FROM outbox o"
        " WHERE o.sink = %(sink)s AND o.ready_at IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM unnest(%(bs)s::text[], %(bb)s::text[]) AS busy (source, batch_id)"
        " WHERE busy.source = o.source AND busy.batch_id = o.batch_id)",
        {"sink": sink, "me": me, **_busy(busy)},
    )
    found = await cur.fetchone()
    return None if found is None or found["at"] is None else float(found["at"])


async def _promote(conn: Conn, sink: str, queues: Sequence[tuple[str, str]]) -> None:
    """Make the lowest pending sequence of each (source, batch id) queue its head (due at its next attempt),
    in one statement however many queues."""
    if not queues:
        return
    await conn.execute(
        "UPDATE outbox o SET ready_at = o.next_attempt_at, claimed_by = NULL, claimed_until = NULL FROM"
        " (SELECT DISTINCT ON (p.source, p.batch_id) p.event_id FROM outbox p"
        " JOIN unnest(%s::text[], %s::text[]) AS q (source, batch_id)"
        " ON p.source = q.source AND p.batch_id = q.batch_id WHERE p.sink = %s AND p.state = 'pending'"
        " ORDER BY p.source, p.batch_id, p.sequence, p.enqueued_at) AS h"
        " WHERE o.sink = %s AND o.event_id = h.event_id",
        ([q for q, _ in queues], [b for _, b in queues], sink, sink),
    )


async def finish(conn: Conn, sink: str, event_ids: Sequence[str], *, state: str, error: str | None, now: float) -> None:
    """Close rows (delivered or dead) and promote each affected batch's next row, in two statements."""
    cur = await conn.execute(
        "UPDATE outbox SET state = %s, attempts = attempts + 1, updated_at = %s, last_error = %s,"
        " ready_at = NULL, claimed_by = NULL, claimed_until = NULL WHERE sink = %s AND event_id = ANY(%s)"
        " RETURNING source, batch_id",
        (state, now, error, sink, list(event_ids)),
    )
    await _promote(conn, sink, sorted({(r["source"], r["batch_id"]) for r in await cur.fetchall()}))


async def mark_retry(conn: Conn, sink: str, event_id: str, *, next_attempt_at: float, error: str, now: float) -> None:
    # Still the head unless a redelivered earlier row took its place meanwhile: then it waits its turn.
    await conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = %s,"
        " ready_at = CASE WHEN ready_at IS NULL THEN NULL ELSE %s END, last_error = %s, updated_at = %s,"
        " claimed_by = NULL, claimed_until = NULL WHERE sink = %s AND event_id = %s",
        (next_attempt_at, next_attempt_at, error[:500], now, sink, event_id),
    )


async def deliveries(conn: Conn, sink: str | None, states: Sequence[str]) -> list[Delivery]:
    cur = await conn.execute(
        "SELECT o.sink, o.event_id, o.batch_id, e.type, o.sequence, o.state, o.attempts, o.next_attempt_at,"
        " o.last_error FROM outbox o JOIN events e ON e.id = o.event_id WHERE o.state = ANY(%s)"
        " AND (%s::text IS NULL OR o.sink = %s) ORDER BY o.sink, o.enqueued_at, o.sequence",
        (list(states), sink, sink),
    )
    return [
        Delivery(
            r["sink"],
            r["event_id"],
            r["batch_id"],
            r["type"],
            int(r["sequence"]),
            r["state"],
            int(r["attempts"]),
            float(r["next_attempt_at"]),
            r["last_error"],
        )
        for r in await cur.fetchall()
    ]


async def redeliver(conn: Conn, sink: str | None, event_id: str | None, now: float) -> int:
    """Put dead (or, for one named event, delivered) rows back in their batch's sequence order."""
    cur = await conn.execute(
        "UPDATE outbox SET state = 'pending', next_attempt_at = 0, updated_at = %(now)s, attempts = 0"
        " WHERE (%(event)s::text IS NULL AND state = 'dead'"
        " OR event_id = %(event)s AND state IN ('dead', 'delivered'))"
        " AND (%(sink)s::text IS NULL OR sink = %(sink)s) RETURNING sink, source, batch_id",
        {"now": now, "event": event_id, "sink": sink},
    )
    rows = await cur.fetchall()
    for q_sink, source, batch_id in sorted({(r["sink"], r["source"], r["batch_id"]) for r in rows}):
        await conn.execute(
            "UPDATE outbox SET ready_at = NULL, claimed_by = NULL, claimed_until = NULL"
            " WHERE sink = %s AND source = %s AND batch_id = %s",
            (q_sink, source, batch_id),
        )
        await _promote(conn, q_sink, [(source, batch_id)])
    if rows:
        await bump_revision(conn)
    return len(rows)


async def outbox_stats(conn: Conn) -> dict[str, dict[str, Any]]:
    cur = await conn.execute(
        "SELECT sink, state, count(*) AS n, min(enqueued_at) AS oldest FROM outbox WHERE state != 'delivered'"
        " GROUP BY sink, state ORDER BY sink, state"
    )
    stats: dict[str, dict[str, Any]] = {}
    for r in await cur.fetchall():
        entry = stats.setdefault(r["sink"], {"pending": 0, "dead": 0, "oldest_pending": None})
        entry[r["state"]] = int(r["n"])
        if r["state"] == "pending":
            entry["oldest_pending"] = float(r["oldest"])
    return stats


async def release_claims(conn: Conn, me: str) -> None:
    """Free `me`'s claims (a clean shutdown), so another replica sends those heads at once."""
    await conn.execute("UPDATE outbox SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = %s", (me,))
