"""Per-source leases on PostgreSQL: taking one is a single upsert, so two replicas never both hold it."""

from __future__ import annotations

from collections.abc import Sequence

from poller.store.postgres.batches import Conn

ACQUIRE = (
    "INSERT INTO leases (source, holder, expires_at) VALUES (%s, %s, %s) ON CONFLICT (source) DO UPDATE SET"
    " holder = excluded.holder, expires_at = excluded.expires_at"
    " WHERE leases.holder = excluded.holder OR leases.expires_at <= %s"
)


async def acquire(conn: Conn, holder: str, sources: Sequence[str], *, now: float, ttl: float) -> list[str]:
    held = []
    for source in sources:
        cur = await conn.execute(ACQUIRE, (source, holder, now + ttl, now))
        if cur.rowcount:
            held.append(source)
    return held


async def release(conn: Conn, holder: str, sources: Sequence[str] | None) -> None:
    await conn.execute(
        "DELETE FROM leases WHERE holder = %s AND (%s::text[] IS NULL OR source = ANY(%s))",
        (holder, None if sources is None else list(sources), None if sources is None else list(sources)),
    )


async def leases(conn: Conn) -> dict[str, tuple[str, float]]:
    cur = await conn.execute("SELECT source, holder, expires_at FROM leases ORDER BY source")
    return {r["source"]: (r["holder"], float(r["expires_at"])) for r in await cur.fetchall()}
