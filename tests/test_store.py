"""The SQLite store against real files in tmp_path: tracking, the transactional outbox, ordering, pruning."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from poller.errors import ConfigError
from poller.models import Batch
from poller.records import FINAL, GONE, NewEvent, TrackedBatch
from poller.store import DUE_HEADS_SQL, Store
from poller.transitions import Knowledge, Policy, detect
from tests.helpers import make_batch

SRC = "openai"
NOW = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state" / "state.db") as s:
        yield s


def event(batch_id: str, sequence: int, sinks: Sequence[str] = ("mqtt",), event_id: str | None = None) -> NewEvent:
    eid = event_id or f"evt_{batch_id}_{sequence}"
    payload = json.dumps({"id": eid, "type": "batch.test", "data": {"id": batch_id, "sequence": sequence}})
    return NewEvent(
        id=eid,
        type="batch.test",
        sequence=sequence,
        created_at=int(NOW),
        detected_at=NOW,
        payload=payload.encode(),
        sinks=list(sinks),
    )


def row(store: Store, batch_id: str, **changes: object) -> TrackedBatch:
    current = store.batch(SRC, batch_id)
    assert current is not None
    return replace(current, **changes)  # type: ignore[arg-type]


def enqueue(store: Store, batch_id: str, *events: NewEvent) -> int:
    store.track(SRC, [batch_id], "cli", NOW)
    return store.save([(row(store, batch_id), list(events))], NOW)


def heads(
    store: Store, sink: str = "mqtt", now: float = NOW, busy: set[tuple[str, str]] | None = None
) -> list[tuple[str, int]]:
    return [(r.batch_id, r.sequence) for r in store.due_heads(sink, now, busy or set(), 100)]


# -- tracking ----------------------------------------------------------------------------------------


def test_track_and_untrack_are_idempotent(store: Store) -> None:
    assert store.track(SRC, ["a", "b"], "cli", NOW) == ["a", "b"]
    assert store.track(SRC, ["b", "c"], "cli", NOW + 1) == ["c"]
    assert store.track(SRC, ["a", "b", "c"], "cli", NOW + 2) == []
    assert [b.id for b in store.batches(SRC)] == ["a", "b", "c"]
    assert store.batch(SRC, "a") is not None
    assert store.batch(SRC, "a").added_at == NOW  # type: ignore[union-attr]

    assert store.untrack(SRC, ["a", "zzz"]) == ["a"]
    assert store.untrack(SRC, ["a"]) == []
    assert [b.id for b in store.batches(SRC)] == ["b", "c"]


def test_same_id_in_two_sources_is_two_batches(store: Store) -> None:
    store.track("openai", ["a"], "cli", NOW)
    assert store.track("azure", ["a"], "cli", NOW) == ["a"]
    assert [(b.source, b.id) for b in store.batches()] == [("azure", "a"), ("openai", "a")]
    assert [b.source for b in store.batches("azure")] == ["azure"]


# -- save: batch row + events + outbox in one transaction -----------------------------------------


def test_save_writes_row_events_and_one_outbox_row_per_sink(store: Store) -> None:
    store.track(SRC, ["a"], "cli", NOW)
    knowledge = Knowledge(status="in_progress", seen=frozenset({"validating", "in_progress"}), sequence=2)
    updated = row(store, "a", knowledge=knowledge, snapshot={"id": "a", "status": "in_progress"}, next_due=NOW + 30)
    enqueued = store.save([(updated, [event("a", 1, ["mqtt", "webhook"]), event("a", 2, ["mqtt"])])], NOW)

    assert enqueued == 3
    saved = store.batch(SRC, "a")
    assert saved is not None
    assert saved.knowledge == knowledge
    assert saved.snapshot == {"id": "a", "status": "in_progress"}
    assert saved.next_due == NOW + 30
    assert [e["data"]["sequence"] for e in store.events_for(SRC, "a")] == [1, 2]
    assert sorted((d.sink, d.sequence) for d in store.deliveries()) == [("mqtt", 1), ("mqtt", 2), ("webhook", 1)]


def test_the_same_event_saved_twice_is_enqueued_once(store: Store) -> None:
    first = event("a", 1, ["mqtt", "webhook"])
    assert enqueue(store, "a", first) == 2
    assert store.save([(row(store, "a"), [first])], NOW + 5) == 0
    assert store.save([(row(store, "a"), [first, event("a", 2)])], NOW + 6) == 1
    assert len(store.deliveries()) == 3
    assert len(store.events_for(SRC, "a")) == 2


def test_a_failing_save_writes_nothing(store: Store) -> None:
    store.track(SRC, ["a", "b"], "cli", NOW)
    good = (row(store, "a", state=FINAL, finished_at=NOW), [event("a", 1)])
    broken = NewEvent(
        id="evt_bad", type="batch.test", sequence=1, created_at=0, detected_at=0.0, payload=b"\xff", sinks=["mqtt"]
    )
    with pytest.raises(UnicodeDecodeError):
        store.save([good, (row(store, "b"), [broken])], NOW)

    assert store.batch(SRC, "a").state == "active"  # type: ignore[union-attr]
    assert store.events_for(SRC, "a") == []
    assert store.deliveries() == []
    assert enqueue(store, "c", event("c", 1)) == 1  # the connection is usable afterwards


def test_save_does_not_recreate_an_untracked_batch(store: Store) -> None:
    store.track(SRC, ["a"], "cli", NOW)
    stale = row(store, "a")
    store.untrack(SRC, ["a"])
    assert store.save([(stale, [event("a", 1)])], NOW) == 0
    assert store.batch(SRC, "a") is None
    assert store.deliveries() == []


@pytest.mark.parametrize("name", ["what?", "hash#tag", "50%20off"])
def test_state_path_with_uri_special_characters(tmp_path: Path, name: str) -> None:
    """A state directory may legitimately contain '?', '#' or '%'; the file must land where it was asked."""
    path = tmp_path / name / "state.db"
    with Store(path) as s:
        s.track(SRC, ["a"], "cli", NOW)
    assert path.exists(), f"{path} was not created"
    with Store(path) as again:
        assert [b.id for b in again.batches(SRC)] == ["a"]


# -- outbox heads ------------------------------------------------------------------------------------


def test_due_heads_returns_only_the_lowest_pending_sequence_per_batch(store: Store) -> None:
    enqueue(store, "a", event("a", 1), event("a", 2), event("a", 3))
    enqueue(store, "b", event("b", 1, ["mqtt", "webhook"]))
    enqueue(store, "c", event("c", 4, ["webhook"]))

    assert sorted(heads(store)) == [("a", 1), ("b", 1)]
    assert sorted(heads(store, "webhook")) == [("b", 1), ("c", 4)]
    rows = store.due_heads("mqtt", NOW, set(), 100)
    assert all(json.loads(r.payload)["data"]["sequence"] == r.sequence for r in rows)


def test_due_heads_skips_busy_batches_and_respects_the_limit(store: Store) -> None:
    enqueue(store, "a", event("a", 1), event("a", 2))
    enqueue(store, "b", event("b", 1))
    assert heads(store, busy={(SRC, "a")}) == [("b", 1)]
    assert sorted(heads(store, busy={("azure", "a")})) == [("a", 1), ("b", 1)]  # busy is keyed by source too
    assert len(store.due_heads("mqtt", NOW, set(), 1)) == 1


def test_a_head_not_yet_due_blocks_its_batch(store: Store) -> None:
    enqueue(store, "a", event("a", 1), event("a", 2))
    enqueue(store, "b", event("b", 1))
    store.mark_retry("mqtt", "evt_a_1", NOW + 60, "503 from broker", NOW)

    assert heads(store, now=NOW) == [("b", 1)]  # a's second event must not overtake its first
    assert store.next_ready_at("mqtt") == 0.0  # b's head
    # With b in flight, the worker's next wake is a's retry, not a's second row queued behind it.
    assert store.next_ready_at("mqtt", {(SRC, "b")}) == NOW + 60
    assert sorted(heads(store, now=NOW + 60)) == [("a", 1), ("b", 1)]
    [delivery] = [d for d in store.deliveries("mqtt") if d.event_id == "evt_a_1"]
    assert delivery.attempts == 1
    assert delivery.last_error == "503 from broker"


def test_delivered_dead_and_redelivered_heads(store: Store) -> None:
    enqueue(store, "a", event("a", 1), event("a", 2), event("a", 3))

    store.mark_delivered("mqtt", ["evt_a_1"], NOW + 1)
    assert heads(store) == [("a", 2)]

    store.mark_dead("mqtt", "evt_a_2", "400 rejected", NOW + 2)
    assert heads(store) == [("a", 3)]
    assert [(d.event_id, d.state) for d in store.deliveries("mqtt", states=("dead",))] == [("evt_a_2", "dead")]

    assert store.redeliver("mqtt", None, NOW + 3) == 1
    assert heads(store) == [("a", 2)]
    assert store.deliveries("mqtt", states=("dead",)) == []

    store.mark_delivered("mqtt", ["evt_a_2", "evt_a_3"], NOW + 4)
    assert heads(store) == []
    assert store.redeliver("mqtt", "evt_a_1", NOW + 5) == 1  # one named delivered event can be replayed
    assert heads(store) == [("a", 1)]


def test_sinks_progress_independently(store: Store) -> None:
    enqueue(store, "a", event("a", 1, ["mqtt", "webhook"]), event("a", 2, ["mqtt", "webhook"]))
    store.mark_delivered("mqtt", ["evt_a_1"], NOW)
    assert heads(store, "mqtt") == [("a", 2)]
    assert heads(store, "webhook") == [("a", 1)]


# -- prune -------------------------------------------------------------------------------------------


def test_prune_removes_only_finished_batches_older_than_the_cutoff(store: Store) -> None:
    store.track(SRC, ["old-final", "new-final", "old-gone", "active"], "cli", NOW - 10_000)
    store.save(
        [
            (row(store, "old-final", state=FINAL, finished_at=NOW - 5_000), []),
            (row(store, "new-final", state=FINAL, finished_at=NOW - 10), []),
            (row(store, "old-gone", state=GONE, finished_at=NOW - 6_000), []),
        ],
        NOW,
    )
    pruned = store.prune(NOW - 1_000)
    assert sorted(b.id for b in pruned) == ["old-final", "old-gone"]
    assert sorted(b.id for b in store.batches(SRC)) == ["active", "new-final"]
    assert store.prune(NOW - 1_000) == []


def test_prune_keeps_events_that_a_sink_still_owes(store: Store) -> None:
    store.track(SRC, ["a"], "cli", NOW - 10_000)
    old = replace(event("a", 1), detected_at=NOW - 9_000)
    store.save([(row(store, "a", state=FINAL, finished_at=NOW - 5_000), [old])], NOW - 9_000)
    store.prune(NOW)
    assert heads(store, now=NOW) == [("a", 1)]
    assert len(store.events_for(SRC, "a")) == 1

    store.mark_delivered("mqtt", ["evt_a_1"], NOW - 100)
    store.prune(NOW)
    assert store.deliveries(states=("pending", "dead", "delivered")) == []
    assert store.events_for(SRC, "a") == []


# -- concurrency and persistence ---------------------------------------------------------------------


def test_data_version_changes_when_another_store_commits(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as daemon, Store(path) as cli:
        before = daemon.data_version()
        assert daemon.data_version() == before
        cli.track(SRC, ["from-cli"], "cli", NOW)
        assert daemon.data_version() != before
        assert [b.id for b in daemon.batches(SRC)] == ["from-cli"]


def test_readonly_store_sees_committed_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as writer:
        enqueue(writer, "a", event("a", 1))
        with Store(path, readonly=True) as reader:
            assert [b.id for b in reader.batches()] == ["a"]
            assert [d.event_id for d in reader.deliveries()] == ["evt_a_1"]


def real_knowledge() -> Knowledge:
    """Knowledge as detection builds it, with every field populated."""
    policy = Policy(progress_interval=1.0, stall_after=10.0, expiry_warning=10_000.0)

    def batch(done: int) -> Batch:
        return make_batch(
            "in_progress",
            "a",
            endpoint="/v1/embeddings",
            created_at=1,
            expires_at=int(NOW) + 5_000,
            request_counts={"completed": done, "failed": 1, "total": 9},
        )

    known = Knowledge()
    for now, done in [(NOW, 1), (NOW + 5, 2), (NOW + 20, 2)]:
        known = detect(SRC, known, batch(done), now, policy).knowledge
    return known


@pytest.mark.parametrize(
    "knowledge",
    [
        pytest.param(Knowledge(), id="empty"),
        pytest.param(
            Knowledge(
                status="in_progress",
                seen=frozenset({"validating", "in_progress"}),
                sequence=7,
                counts=(5, 1, 10),
                counts_changed_at=NOW - 12.5,
                progress_counts=(4, 1, 10),
                progress_at=NOW - 30.25,
                stalled_at_counts=(5, 1, 10),
                expiring_sent=True,
            ),
            id="every-field",
        ),
        pytest.param(real_knowledge(), id="from-detection"),
    ],
)
def test_knowledge_round_trips(tmp_path: Path, knowledge: Knowledge) -> None:
    path = tmp_path / "state.db"
    with Store(path) as first:
        first.track(SRC, ["a"], "cli", NOW)
        first.save([(row(first, "a", knowledge=knowledge), [])], NOW)
    with Store(path) as reopened:
        assert reopened.batch(SRC, "a").knowledge == knowledge  # type: ignore[union-attr]


def test_real_knowledge_has_every_field() -> None:
    known = real_knowledge()
    assert known.progress_counts is not None
    assert known.stalled_at_counts is not None
    assert known.expiring_sent


def test_heads_stay_cheap_with_a_large_backlog(store: Store) -> None:
    """due_heads reads only heads through an index: a deep queue behind one batch costs nothing."""
    enqueue(store, "deep", *[event("deep", i) for i in range(1, 2001)])
    enqueue(store, "b", event("b", 1))
    plan = store._db.execute("EXPLAIN QUERY PLAN " + DUE_HEADS_SQL, ("mqtt", NOW, 10)).fetchall()
    assert any("outbox_heads" in row[3] for row in plan), plan
    assert not any("TEMP B-TREE" in row[3] for row in plan), plan  # the index gives the order: no sort
    assert sorted(heads(store)) == [("b", 1), ("deep", 1)]
    store.mark_delivered("mqtt", ["evt_deep_1"], NOW)
    assert sorted(heads(store)) == [("b", 1), ("deep", 2)]


def test_retracking_resumes_the_sequence_and_remembers_announced_statuses(store: Store) -> None:
    enqueue(store, "a", event("a", 1), event("a", 2))
    store.untrack(SRC, ["a"], NOW)
    assert store.untracked(SRC, ["a", "b"]) == {"a"}
    assert store.track(SRC, ["a"], "cli", NOW + 1) == ["a"]
    assert store.untracked(SRC, ["a"]) == set()
    known = store.batch(SRC, "a").knowledge
    assert known.sequence == 2
    assert known.status is None


def test_a_row_failing_after_an_earlier_one_was_redelivered_does_not_become_a_second_head(store: Store) -> None:
    enqueue(store, "a", event("a", 1), event("a", 2))
    store.mark_dead("mqtt", "evt_a_1", "400", NOW)
    assert heads(store) == [("a", 2)]  # row 2 goes out (in flight now) ...
    assert store.redeliver("mqtt", None, NOW + 1) == 1  # ... while the CLI re-queues row 1
    store.mark_retry("mqtt", "evt_a_2", NOW + 2, "503", NOW + 1)  # then row 2 fails
    assert heads(store, now=NOW + 10) == [("a", 1)]  # one head: the redelivered row, then row 2
    ready = store._db.execute("SELECT COUNT(*) FROM outbox WHERE batch_id = 'a' AND ready_at IS NOT NULL")
    assert ready.fetchone()[0] == 1
    store.mark_delivered("mqtt", ["evt_a_1"], NOW + 3)
    assert heads(store, now=NOW + 10) == [("a", 2)]


def test_a_state_file_of_another_schema_version_is_refused_with_the_fix(tmp_path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(ConfigError) as info:
        Store(path)
    assert info.value.key == "state.path"
    assert "version 99" in info.value.render()
    Store(tmp_path / "fresh.db").close()  # a new file is simply created
