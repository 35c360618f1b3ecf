"""The PostgreSQL schema: created and migrated by whichever replica starts first, one numbered file at a
time, each in one transaction under an advisory lock (so replicas starting together migrate once).

The version lives in `schema_version`; `migrations/postgres/NNNN_*.sql` each move it one up. A database
at a newer version than this release knows is refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow, tuple_row

from poller.errors import ConfigError
from poller.store.codec import fingerprint

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
#: Rows the fingerprint backfill reads and writes at a time.
BACKFILL_CHUNK = 1000


async def _backfill_fingerprints(conn: AsyncConnection[DictRow]) -> None:
    """Version 3: the fingerprint of every stored body (computed here: PostgreSQL has no BLAKE2b)."""
    async with conn.cursor(name="poller_backfill", row_factory=tuple_row) as rows, conn.cursor() as update:
        await rows.execute("SELECT source, id, snapshot FROM batches WHERE snapshot IS NOT NULL AND snapshot <> ''")
        while chunk := await rows.fetchmany(BACKFILL_CHUNK):
            await update.executemany(
                "UPDATE batches SET fingerprint = %s WHERE source = %s AND id = %s",
                [(fingerprint(body), source, batch_id) for source, batch_id, body in chunk],
            )


#: Steps in Python that follow a schema file's SQL, in its transaction.
AFTER: dict[int, Callable[[AsyncConnection[DictRow]], Awaitable[None]]] = {3: _backfill_fingerprints}


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
                    if number in AFTER:
                        await AFTER[number](conn)
                    await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
            except psycopg.Error as exc:
                raise ConfigError(
                    "state.url",
                    f"cannot upgrade {where} to schema version {number}: {exc}",
                    "report this; the step was rolled back and the database left as it was",
                ) from None
