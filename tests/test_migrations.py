"""Schema upgrades of the SQLite state file, from a real file the previous release wrote.

tests/data/state-v1.db is schema version 1: six batches of source "openai" (three final, three still
finalizing), 29 events, and their outbox rows: sink "file" delivered all 29, sink "hook" dead-lettered
28 and has one pending (a retry of the newest event). Each test upgrades its own copy in tmp_path.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from poller.domain.transitions import Knowledge
from poller.errors import ConfigError
from poller.store import ACTIVE, FINAL, open_store
from poller.store.base import NewEvent, Write
from poller.store.codec import fingerprint, knowledge_from_json
from poller.store.sqlite._conn import SCHEMA_VERSION

V1 = Path(__file__).resolve().parent / "data" / "state-v1.db"
SRC = "openai"
PENDING_EVENT = "evt_34f0db14235a5230b5a597357a868748"
PENDING_BATCH = "batch_eRRNcXMyPgqo1ejMjEPD9rOkDwyL3K17"
PENDING_READY_AT = 1796283238.8547406
LATER = 1_800_000_000.0
ALL_STATES = ("pending", "dead", "delivered")


def read(path: Path, sql: str, *args: object) -> list[dict[str, Any]]:
    db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql, args)]
    finally:
        db.close()


def dump(path: Path) -> list[str]:
    """The whole file as SQL text: schema, version and every row."""
    db = sqlite3.connect(path)
    try:
        return [f"PRAGMA user_version = {db.execute('PRAGMA user_version').fetchone()[0]}", *db.iterdump()]
    finally:
        db.close()


def user_version(path: Path) -> int:
    return int(read(path, "PRAGMA user_version")[0]["user_version"])


@pytest.fixture(scope="module")
def original() -> dict[str, list[dict[str, Any]]]:
    """The v1 file's rows, read before anything touches it."""
    assert user_version(V1) == 1
    return {
        "batches": read(V1, "SELECT * FROM batches ORDER BY added_at, id"),
        "events": read(V1, "SELECT * FROM events ORDER BY detected_at, source, batch_id, sequence"),
        "outbox": read(V1, "SELECT * FROM outbox ORDER BY sink, event_id"),
    }


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    copy = tmp_path / "state.db"
    shutil.copyfile(V1, copy)
    return copy


def test_the_fixture_is_what_the_tests_say() -> None:
    counts = read(V1, "SELECT sink, state, COUNT(*) AS n FROM outbox GROUP BY sink, state ORDER BY sink, state")
    assert [(c["sink"], c["state"], c["n"]) for c in counts] == [
        ("file", "delivered", 29),
        ("hook", "dead", 28),
        ("hook", "pending", 1),
    ]
    assert read(V1, "SELECT COUNT(*) AS n FROM batches") == [{"n": 6}]
    assert SCHEMA_VERSION > 1


async def test_a_v1_file_is_upgraded_in_place_with_every_batch(v1: Path, original: dict[str, Any]) -> None:
    async with open_store(v1) as store:
        batches = await store.batches(with_raw=True)
    assert user_version(v1) == SCHEMA_VERSION
    assert [(b.source, b.id) for b in batches] == [(r["source"], r["id"]) for r in original["batches"]]
    assert sorted(b.state for b in batches) == [ACTIVE, ACTIVE, ACTIVE, FINAL, FINAL, FINAL]
    for batch, before in zip(batches, original["batches"], strict=True):
        assert batch.knowledge == knowledge_from_json(before["knowledge"])
        assert batch.knowledge.status == before["status"]
        assert (batch.state, batch.origin, batch.added_at, batch.created_at) == (
            before["state"],
            before["origin"],
            before["added_at"],
            before["created_at"],
        )
        assert (batch.next_due, batch.interval, batch.error_streak, batch.not_found) == (
            before["next_due"],
            before["interval"],
            before["error_streak"],
            before["not_found"],
        )
        assert (batch.updated_at, batch.finished_at) == (before["updated_at"], before["finished_at"])
        assert batch.raw == json.loads(before["snapshot"])
    # Every stored body got its fingerprint, as the poll loop computes it (it loads no body).
    assert [b.fingerprint for b in batches] == [fingerprint(r["snapshot"]) for r in original["batches"]]
    # The stored sequence became the compare-and-set column.
    assert [r["sequence"] for r in read(v1, "SELECT sequence FROM batches ORDER BY added_at, id")] == [
        json.loads(r["knowledge"])["sequence"] for r in original["batches"]
    ]


async def test_events_keep_their_payloads_and_get_positions_in_detection_order(
    v1: Path, original: dict[str, Any]
) -> None:
    async with open_store(v1) as store:
        logged = await store.read_events(0, 1000)
        last = await store.last_position()
        per_batch = {r["id"]: await store.events_for(SRC, r["id"]) for r in original["batches"]}
    events = original["events"]
    assert len(logged) == len(events) == 29
    assert [e.position for e in logged] == list(range(1, 30))
    assert last == 29
    assert [(e.source, e.batch_id, e.type, e.payload.decode()) for e in logged] == [
        (r["source"], r["batch_id"], r["type"], r["payload"]) for r in events
    ]
    for batch_id, payloads in per_batch.items():
        mine = sorted((r for r in events if r["batch_id"] == batch_id), key=lambda r: r["sequence"])
        assert payloads == [json.loads(r["payload"]) for r in mine]
        assert [p["data"]["sequence"] for p in payloads] == list(range(1, len(mine) + 1))


async def test_the_outbox_is_kept_row_for_row(v1: Path, original: dict[str, Any]) -> None:
    async with open_store(v1) as store:
        deliveries = await store.deliveries(states=ALL_STATES)
        stats = await store.outbox_stats()
    types = {r["id"]: r["type"] for r in original["events"]}
    assert sorted((d.sink, d.event_id, d.batch_id, d.type, d.sequence, d.state, d.attempts) for d in deliveries) == [
        (r["sink"], r["event_id"], r["batch_id"], types[r["event_id"]], r["sequence"], r["state"], r["attempts"])
        for r in original["outbox"]
    ]
    [pending] = [r for r in original["outbox"] if r["state"] == "pending"]
    assert stats == {
        "hook": {"pending": 1, "dead": 28, "oldest_pending": pending["enqueued_at"]},
    }
    assert read(v1, "SELECT * FROM outbox ORDER BY sink, event_id") == original["outbox"]


async def test_the_pending_row_can_be_claimed_and_delivered(v1: Path, original: dict[str, Any]) -> None:
    payloads = {r["id"]: r["payload"] for r in original["events"]}
    async with open_store(v1) as store:
        assert await store.claim_heads("hook", PENDING_READY_AT - 1, set(), 10) == []  # its retry is not due yet
        assert await store.next_ready_at("hook", set()) == PENDING_READY_AT
        assert await store.claim_heads("file", LATER, set(), 10) == []
        [head] = await store.claim_heads("hook", LATER, set(), 10)
        assert (head.sink, head.event_id, head.source, head.batch_id, head.sequence, head.attempts) == (
            "hook",
            PENDING_EVENT,
            SRC,
            PENDING_BATCH,
            7,
            1,
        )
        assert head.payload.decode() == payloads[PENDING_EVENT]
        await store.mark_delivered("hook", [head.event_id], LATER)
        assert await store.claim_heads("hook", LATER, set(), 10) == []
        assert await store.outbox_stats() == {"hook": {"pending": 0, "dead": 28, "oldest_pending": None}}

        # The old dead letters go back into their queues in sequence order: one head per batch.
        assert await store.redeliver("hook", None, LATER) == 28
        heads = await store.claim_heads("hook", LATER, set(), 100)
        assert sorted((h.batch_id, h.sequence) for h in heads) == sorted((r["id"], 1) for r in original["batches"])


async def test_new_events_are_recorded_after_the_old_ones(v1: Path) -> None:
    async with open_store(v1) as store:
        row = await store.batch(SRC, PENDING_BATCH)
        assert row is not None
        assert row.knowledge.sequence == 7
        stale = await store.record([Write(row, expected_sequence=6)], LATER)
        assert stale.conflicts == ((SRC, PENDING_BATCH),)  # the upgraded row compares on its real sequence

        done = Knowledge(
            status="completed",
            seen=row.knowledge.seen | {"completed"},
            sequence=8,
            counts=row.knowledge.counts,
        )
        payload = json.dumps({"id": "evt_new", "type": "batch.completed", "data": {"sequence": 8}}).encode()
        new = NewEvent("evt_new", "batch.completed", 8, int(LATER), LATER, payload, ["file", "hook"])
        updated = replace(row, raw=None, state=FINAL, knowledge=done, finished_at=LATER)
        recorded = await store.record([Write(updated, [new], expected_sequence=7)], LATER)
        assert (recorded.enqueued, recorded.conflicts, recorded.position) == (2, (), 30)
        assert await store.last_position() == 30
        [logged] = await store.read_events(29, 10)
        assert (logged.position, logged.batch_id, logged.payload) == (30, PENDING_BATCH, payload)
        assert [e["data"]["sequence"] for e in await store.events_for(SRC, PENDING_BATCH)] == [1, 2, 3, 4, 5, 6, 7, 8]

        # For "hook" it queues behind the old pending row of its batch; for "file" it is the head at once.
        assert [(h.batch_id, h.sequence) for h in await store.claim_heads("file", LATER, set(), 10)] == [
            (PENDING_BATCH, 8)
        ]
        [head] = await store.claim_heads("hook", LATER, set(), 10)
        assert head.event_id == PENDING_EVENT
        await store.mark_delivered("hook", [PENDING_EVENT], LATER)
        [head] = await store.claim_heads("hook", LATER, set(), 10)
        assert head.event_id == "evt_new"

        assert await store.track(SRC, [PENDING_BATCH], "cli", LATER) == []  # still tracked: nothing to add
        await store.set_cursor(SRC, "discovery", "batch_after")  # a table version 1 did not have
        assert await store.cursor(SRC, "discovery") == "batch_after"


async def test_opening_an_upgraded_file_again_changes_nothing(v1: Path) -> None:
    async with open_store(v1):
        pass
    upgraded = dump(v1)
    async with open_store(v1) as store:
        assert len(await store.batches()) == 6
    assert dump(v1) == upgraded
    assert user_version(v1) == SCHEMA_VERSION


async def test_a_file_from_a_future_version_is_refused(v1: Path) -> None:
    async with open_store(v1):
        pass
    db = sqlite3.connect(v1)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    before = dump(v1)
    with pytest.raises(ConfigError) as info:
        async with open_store(v1):
            pass
    assert info.value.key == "state.path"
    assert f"version {SCHEMA_VERSION + 1}" in info.value.render()
    assert info.value.fix
    assert dump(v1) == before  # left as it was


async def test_a_far_future_version_is_refused_and_a_fresh_file_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with open_store(path):
        pass
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(ConfigError) as info:
        async with open_store(path):
            pass
    assert info.value.key == "state.path"
    assert "version 99" in info.value.render()
    async with open_store(tmp_path / "fresh.db"):  # a new file is simply created
        pass
    assert user_version(tmp_path / "fresh.db") == SCHEMA_VERSION


async def test_an_upgrade_that_fails_leaves_the_file_as_it_was(v1: Path) -> None:
    db = sqlite3.connect(v1)
    db.execute("CREATE TABLE cursors (x)")  # what version 2 creates, already there: its upgrade cannot apply
    db.commit()
    db.close()
    before = dump(v1)
    with pytest.raises(ConfigError) as info:
        async with open_store(v1):
            pass
    assert info.value.key == "state.path"
    assert "schema version 2" in info.value.render()
    assert dump(v1) == before
    assert user_version(v1) == 1
