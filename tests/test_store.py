"""What only the SQLite store does, against real files in tmp_path: where and how the file is opened (WAL,
permissions, read-only), unusable files as ConfigError, `data_version`, and its SQL plans.

The behaviour every store shares is in tests/test_store_contract.py; schema upgrades in test_migrations.py.
"""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from poller.errors import ConfigError
from poller.store import open_store
from poller.store.base import NewEvent, Write
from poller.store.sqlite import SqliteStore
from poller.store.sqlite._conn import padded
from poller.store.sqlite.outbox import DUE_HEADS_SQL

SRC = "openai"
NOW = 1_700_000_000.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(path) as s:
        yield s


def event(batch_id: str, sequence: int) -> NewEvent:
    eid = f"evt_{batch_id}_{sequence}"
    payload = json.dumps({"id": eid, "type": "batch.test", "data": {"id": batch_id, "sequence": sequence}})
    return NewEvent(eid, "batch.test", sequence, int(NOW), NOW, payload.encode(), ["mqtt"])


async def enqueue(store: SqliteStore, batch_id: str, *events: NewEvent) -> int:
    await store.track(SRC, [batch_id], "cli", NOW)
    current = await store.batch(SRC, batch_id)
    assert current is not None
    return (await store.record([Write(current, events)], NOW)).enqueued


async def heads(store: SqliteStore, now: float = NOW) -> list[tuple[str, int]]:
    return [(r.batch_id, r.sequence) for r in await store.claim_heads("mqtt", now, set(), 100)]


def query(path: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Read the file through a connection of its own (as another process would)."""
    db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return [tuple(r) for r in db.execute(sql, args)]
    finally:
        db.close()


# -- opening the file ------------------------------------------------------------------------------


def test_open_store_gives_the_sqlite_store(path: Path) -> None:
    store = open_store(path)
    assert isinstance(store, SqliteStore)
    assert store.description == f"sqlite:{path}"


async def test_a_new_file_is_created_in_wal_mode_in_a_private_directory(path: Path) -> None:
    async with SqliteStore(path) as store:
        assert await store._call(lambda: store._r.conn.db.execute("PRAGMA synchronous").fetchone()[0]) == 1  # NORMAL
    assert path.is_file()
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_an_existing_directory_keeps_its_permissions(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    async with SqliteStore(folder / "state.db"):
        pass
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


@pytest.mark.parametrize("name", ["what?", "hash#tag", "50%20off"])
async def test_state_path_with_uri_special_characters(tmp_path: Path, name: str) -> None:
    """A state directory may legitimately contain '?', '#' or '%'; the file must land where it was asked."""
    path = tmp_path / name / "state.db"
    async with SqliteStore(path) as s:
        await s.track(SRC, ["a"], "cli", NOW)
    assert path.exists(), f"{path} was not created"
    async with SqliteStore(path) as again:
        assert [b.id for b in await again.batches(SRC)] == ["a"]


async def test_readonly_store_sees_committed_rows(path: Path) -> None:
    async with SqliteStore(path) as writer:
        await enqueue(writer, "a", event("a", 1))
        async with SqliteStore(path, readonly=True) as reader:
            assert [b.id for b in await reader.batches()] == ["a"]
            assert [d.event_id for d in await reader.deliveries()] == ["evt_a_1"]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                await reader.track(SRC, ["b"], "cli", NOW)
    assert query(path, "SELECT id FROM batches") == [("a",)]


async def test_readonly_open_never_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "state.db"
    with pytest.raises(ConfigError) as info:
        async with SqliteStore(path, readonly=True):
            pass
    assert info.value.key == "state.path"
    assert not path.parent.exists()


def unusable(tmp_path: Path, kind: str) -> Path:
    match kind:
        case "parent-is-a-file":
            (tmp_path / "plain").write_text("not a directory")
            return tmp_path / "plain" / "state.db"
        case "ancestor-is-a-file":
            (tmp_path / "plain").write_text("not a directory")
            return tmp_path / "plain" / "deeper" / "state.db"
        case "is-a-directory":
            (tmp_path / "state.db").mkdir()
            return tmp_path / "state.db"
        case "not-a-database":
            (tmp_path / "state.db").write_bytes(b"this is no SQLite file, " * 200)
            return tmp_path / "state.db"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["parent-is-a-file", "ancestor-is-a-file", "is-a-directory", "not-a-database"])
async def test_an_unusable_file_is_a_config_error_naming_state_path(tmp_path: Path, kind: str) -> None:
    path = unusable(tmp_path, kind)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(ConfigError) as info:
        async with SqliteStore(path):
            pass
    assert info.value.key == "state.path"
    assert str(path) in info.value.render()
    assert info.value.fix
    if before is not None:
        assert path.read_bytes() == before  # left as it was


# -- other writers ---------------------------------------------------------------------------------


async def test_data_version_changes_when_another_store_commits(path: Path) -> None:
    async with SqliteStore(path) as daemon, SqliteStore(path) as cli:

        async def version() -> int:
            return await daemon._call(daemon._r.conn.data_version)

        before = await version()
        assert await version() == before
        await daemon.track(SRC, ["own"], "cli", NOW)
        assert await version() == before  # its own commits are not news to it
        await cli.track(SRC, ["from-cli"], "cli", NOW)
        assert await version() != before
        assert sorted(b.id for b in await daemon.batches(SRC)) == ["from-cli", "own"]


# -- SQL ---------------------------------------------------------------------------------------------


async def test_heads_stay_cheap_with_a_large_backlog(store: SqliteStore, path: Path) -> None:
    """claim_heads reads only heads through an index: a deep queue behind one batch costs nothing."""
    await enqueue(store, "deep", *[event("deep", i) for i in range(1, 2001)])
    await enqueue(store, "b", event("b", 1))
    plan = query(path, "EXPLAIN QUERY PLAN " + DUE_HEADS_SQL, "mqtt", NOW, 10)
    assert any("outbox_heads" in str(row[3]) for row in plan), plan
    assert not any("TEMP B-TREE" in str(row[3]) for row in plan), plan  # the index gives the order: no sort
    assert sorted(await heads(store)) == [("b", 1), ("deep", 1)]
    await store.mark_delivered("mqtt", ["evt_deep_1"], NOW)
    assert sorted(await heads(store)) == [("b", 1), ("deep", 2)]


async def test_a_queue_has_one_ready_row_after_redelivery_and_retry(store: SqliteStore, path: Path) -> None:
    """Only a queue's head carries ready_at, also when a redelivered row overtakes one in flight."""
    await enqueue(store, "a", event("a", 1), event("a", 2))
    await store.mark_dead("mqtt", "evt_a_1", "400", NOW)
    assert await heads(store) == [("a", 2)]
    assert await store.redeliver("mqtt", None, NOW + 1) == 1
    await store.mark_retry("mqtt", "evt_a_2", NOW + 2, "503", NOW + 1)
    ready = "SELECT event_id FROM outbox WHERE batch_id = 'a' AND ready_at IS NOT NULL"
    assert query(path, ready) == [("evt_a_1",)]
    await store.mark_delivered("mqtt", ["evt_a_1"], NOW + 3)
    assert query(path, ready) == [("evt_a_2",)]


async def test_rows_are_finished_by_statements_of_a_few_lengths(store: SqliteStore, path: Path) -> None:
    """`IN (...)` lists are padded with NULLs to a power of two: a few statement texts whatever the counts
    (SQLite's statement cache is then not filled with one per count), and only the rows named change."""
    assert [len(padded(["x"] * n)) for n in (1, 2, 3, 5, 8, 9, 500)] == [1, 2, 4, 8, 8, 16, 512]
    assert padded(["a", "b", "c"]) == ["a", "b", "c", None]
    for n in range(1, 8):
        await enqueue(store, f"b{n}", *[event(f"b{n}", i) for i in range(1, n + 2)])
    for n in range(1, 8):  # n rows of each batch, in one call: every count from 1 to 7
        await store.mark_delivered("mqtt", [f"evt_b{n}_{i}" for i in range(1, n + 1)], NOW)
    pending = "SELECT event_id FROM outbox WHERE state = 'pending' AND ready_at IS NOT NULL ORDER BY event_id"
    assert query(path, pending) == [(f"evt_b{n}_{n + 1}",) for n in range(1, 8)]
    assert await store.untracked(SRC, [f"b{n}" for n in range(1, 4)]) == set()
    await store.untrack(SRC, ["b1", "b2", "b3"], NOW)
    assert await store.untracked(SRC, ["b1", "b2", "b3", "b4", "b5"]) == {"b1", "b2", "b3"}
