"""The SQLite connection: opened in WAL mode, migrated in place from the schema files, one transaction
per write.

Schema versions are `PRAGMA user_version`; `migrations/sqlite/NNNN_*.sql` each move the schema one
version up, in one transaction with the version bump. A file newer than this release is refused.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from poller.errors import ConfigError
from poller.store.codec import fingerprint


def migrations() -> list[tuple[int, str]]:
    """The schema files as (version, SQL), in order."""
    folder = resources.files("poller.store") / "migrations" / "sqlite"
    found = []
    for item in folder.iterdir():
        name = item.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), item.read_text(encoding="utf-8")))
    return sorted(found)


SCHEMA_VERSION = max(v for v, _ in migrations())


class Connection:
    """One SQLite connection and its transactions; used from one thread only."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        try:
            if not self.readonly:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            uri = path.absolute().as_uri() + ("?mode=ro" if self.readonly else "")
            db = sqlite3.connect(uri, uri=True, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.create_function("poller_fingerprint", 1, fingerprint, deterministic=True)  # for migrations
            db.execute("PRAGMA busy_timeout = 10000")
            if not self.readonly:
                _wal(db)
                # WAL with synchronous=NORMAL survives any process crash; a power cut may lose the last
                # commits, which the next poll re-detects under the same event ids.
                db.execute("PRAGMA synchronous = NORMAL")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                "state.path",
                f"cannot open the state file {path}: {exc}",
                "point state.path at a writable file in an existing or creatable directory",
            ) from None
        if not self.readonly:
            self._migrate(db)
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            db.close()
            raise ConfigError(
                "state.path",
                f"{self.path} has state schema version {version}; this batch-poller reads up to {SCHEMA_VERSION}",
                "run the batch-poller version that wrote it, or move the file aside to start afresh",
            )
        for number, sql in migrations():
            if number <= version:
                continue
            try:
                db.execute("BEGIN IMMEDIATE")
                for statement in _statements(sql):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number:d}")
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                db.execute("ROLLBACK")
                db.close()
                raise ConfigError(
                    "state.path",
                    f"cannot upgrade {self.path} to schema version {number}: {exc}",
                    "keep a copy of the file and report this; the file was left as it was",
                ) from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def data_version(self) -> int:
        """Changes when another connection committed."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])


def _wal(db: sqlite3.Connection, patience: float = 10.0) -> None:
    """Switch to WAL. Two processes opening a new file at once (the daemon starting while a command such as
    `batch-poller deliveries` opens it) both upgrade a shared lock to switch, and SQLite answers one of
    them "database is locked" at once, without busy_timeout (it would deadlock): retry that one."""
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return


def _statements(sql: str) -> list[str]:
    """A schema file's statements (they hold no semicolons inside literals)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def marks(count: int) -> str:
    return ",".join("?" * count)


def chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def padded(values: list[str]) -> list[str | None]:
    """`values` and NULLs (which an `IN (...)` never matches) up to the next power of two, for an `IN` of
    as many marks: the statements then differ by a few lengths, not by every count. SQLite's statement
    cache keeps 128, each 10 to 100 kB, and was full of one `IN` per acknowledged-batch size (3 MB)."""
    size = 1 << max(len(values) - 1, 0).bit_length()
    return [*values, *[None] * (size - len(values))]
