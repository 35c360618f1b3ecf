"""The PostgreSQL schema: created and migrated by whichever replica starts first, one numbered file at a
time, each in one transaction under an advisory lock (so replicas starting together migrate once).

The version lives in `schema_version`; `migrations/postgres/NNNN_*.sql` each move it one up. A database
at a newer version than this release knows is refused.
"""

from __future__ import annotations

from importlib import resources

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow

from poller.errors import ConfigError

#: Any constant: the advisory lock replicas take while they migrate.
MIGRATION_LOCK = 0x6261_7463_6870_6F6C


def migrations() -> list[tuple[int, str]]:
    """The schema files as (version, SQL), in order."""
    folder = resources.files("poller.store") / "migrations" / "postgres"
    found = []
    for item in folder.iterdir():
        name = item.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), item.read_text(encoding="utf-8")))
    return sorted(found)


SCHEMA_VERSION = max(v for v, _ in migrations())


async def migrate(conn: AsyncConnection[DictRow], where: str) -> None:
    """Bring the schema to SCHEMA_VERSION; raises ConfigError for a newer schema or a failed step."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cur = await conn.execute("SELECT max(version) AS version FROM schema_version")
        found = await cur.fetchone()
        version = int(found["version"]) if found and found["version"] is not None else 0
        if version > SCHEMA_VERSION:
            raise ConfigError(
                "state.url",
                f"{where} has state schema version {version}; this batch-poller reads up to {SCHEMA_VERSION}",
                "run the batch-poller version that wrote it (every replica the same release)",
            )
        for number, sql in migrations():
            if number <= version:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(sql.encode())
                    await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
            except psycopg.Error as exc:
                raise ConfigError(
                    "state.url",
                    f"cannot upgrade {where} to schema version {number}: {exc}",
                    "report this; the step was rolled back and the database left as it was",
                ) from None
