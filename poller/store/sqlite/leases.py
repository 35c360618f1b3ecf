"""Per-source leases on SQLite (one process owns a SQLite file, but the contract is the same)."""

from __future__ import annotations

from collections.abc import Sequence

from poller.store.sqlite._conn import Connection, marks

ACQUIRE = (
    "INSERT INTO leases (source, holder, expires_at) VALUES (?, ?, ?) ON CONFLICT (source) DO UPDATE SET"
    " holder = excluded.holder, expires_at = excluded.expires_at"
    " WHERE leases.holder = excluded.holder OR leases.expires_at <= ?"
)


class LeaseRows:
    conn: Connection

    def acquire_leases(self, holder: str, sources: Sequence[str], now: float, ttl: float) -> list[str]:
        with self.conn.tx() as db:
            return [s for s in sources if db.execute(ACQUIRE, (s, holder, now + ttl, now)).rowcount]

    def release_leases(self, holder: str, sources: Sequence[str] | None) -> None:
        with self.conn.tx() as db:
            if sources is None:
                db.execute("DELETE FROM leases WHERE holder = ?", (holder,))
            elif sources:
                db.execute(
                    "DELETE FROM leases WHERE holder = ? AND source IN (" + marks(len(sources)) + ")",
                    [holder, *sources],
                )

    def leases(self) -> dict[str, tuple[str, float]]:
        rows = self.conn.db.execute("SELECT source, holder, expires_at FROM leases ORDER BY source")
        return {r[0]: (r[1], float(r[2])) for r in rows}
