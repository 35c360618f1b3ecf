"""The behaviour every store implementation promises (`poller.store.base.Store`), held against each one.

Each test takes `store_factory`, parametrised by implementation: calling it gives a new, not yet entered
store on the same, initially empty, state (a second call is another connection: the CLI, or another
replica). A new implementation joins by adding its name to `IMPLEMENTATIONS` and a `<name>_store_factory`
fixture. What only one implementation does (files, pragmas, SQL plans) is tested in its own module.

`claim_heads` is read here the way one process uses it: asked again before anything was marked, it
returns the same heads (the caller's `busy` set is what keeps its own in-flight queues out).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from poller.domain.snapshot import Counts
from poller.domain.transitions import Knowledge, Policy, detect
from poller.store import ACTIVE, FINAL, GONE, Store, TrackedBatch, open_store
from poller.store.base import LoggedEvent, NewEvent, Write
from poller.store.codec import dump_body, fingerprint
from poller.store.postgres import PostgresStore
from tests.helpers import make_snapshot
from tests.postgres import Cluster

SRC = "openai"
NOW = 1_700_000_000.0
ALL_STATES = ("pending", "dead", "delivered")

StoreFactory = Callable[[], Store]

#: One name per implementation; each has a `<name>_store_factory` fixture below.
IMPLEMENTATIONS = ["sqlite", "postgres"]


@pytest.fixture
def sqlite_store_factory(tmp_path: Path) -> StoreFactory:
    path = tmp_path / "state" / "state.db"
    return lambda: open_store(path)


@pytest.fixture
def postgres_store_factory(postgres_cluster: Cluster, postgres_database: str) -> StoreFactory:
    """Stores on one clean database per test; every store of a test has the same replica name, as
    connections of one process would."""
    conninfo = postgres_cluster.conninfo(postgres_database)
    return lambda: PostgresStore(conninfo, postgres_cluster.url(postgres_database), name="test-replica")


@pytest.fixture(params=IMPLEMENTATIONS)
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    factory: StoreFactory = request.getfixturevalue(f"{request.param}_store_factory")
    return factory


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    async with store_factory() as s:
        yield s


def event(
    batch_id: str,
    sequence: int,
    sinks: Sequence[str] = ("mqtt",),
    *,
    event_type: str = "batch.test",
    event_id: str | None = None,
    detected_at: float = NOW,
) -> NewEvent:
    eid = event_id or f"evt_{batch_id}_{sequence}"
    payload = json.dumps({"id": eid, "type": event_type, "data": {"id": batch_id, "sequence": sequence}})
    return NewEvent(
        id=eid,
        type=event_type,
        sequence=sequence,
        created_at=int(NOW),
        detected_at=detected_at,
        payload=payload.encode(),
        sinks=list(sinks),
    )


async def row(store: Store, batch_id: str, source: str = SRC, **changes: object) -> TrackedBatch:
    current = await store.batch(source, batch_id)
    assert current is not None, f"{source}/{batch_id} is not tracked"
    return replace(current, raw=None, **changes)  # type: ignore[arg-type]


async def enqueue(store: Store, batch_id: str, *events: NewEvent, source: str = SRC, now: float = NOW) -> int:
    await store.track(source, [batch_id], "cli", now)
    return (await store.record([Write(await row(store, batch_id, source), events)], now)).enqueued


async def heads(
    store: Store, sink: str = "mqtt", now: float = NOW, busy: set[tuple[str, str]] | None = None
) -> list[tuple[str, int]]:
    return [(r.batch_id, r.sequence) for r in await store.claim_heads(sink, now, busy or set(), 100)]


# -- tracking ----------------------------------------------------------------------------------------


async def test_track_and_untrack_are_idempotent(store: Store) -> None:
    assert await store.track(SRC, ["a", "b"], "cli", NOW) == ["a", "b"]
    assert await store.track(SRC, ["b", "c"], "cli", NOW + 1) == ["c"]
    assert await store.track(SRC, ["a", "b", "c"], "cli", NOW + 2) == []
    assert [b.id for b in await store.batches(SRC)] == ["a", "b", "c"]
    a = await store.batch(SRC, "a")
    assert a is not None
    assert (a.added_at, a.origin, a.state) == (NOW, "cli", ACTIVE)
    assert await store.batch(SRC, "zzz") is None

    assert await store.untrack(SRC, ["a", "zzz"], NOW + 3) == ["a"]
    assert await store.untrack(SRC, ["a"], NOW + 4) == []
    assert [b.id for b in await store.batches(SRC)] == ["b", "c"]


async def test_same_id_in_two_sources_is_two_batches(store: Store) -> None:
    await store.track("openai", ["a"], "cli", NOW)
    assert await store.track("azure", ["a"], "cli", NOW) == ["a"]
    assert [(b.source, b.id) for b in await store.batches()] == [("azure", "a"), ("openai", "a")]
    assert [b.source for b in await store.batches("azure")] == ["azure"]
    assert await store.untrack("azure", ["a"], NOW) == ["a"]
    assert await store.untracked("openai", ["a"]) == set()
    assert [(b.source, b.id) for b in await store.batches()] == [("openai", "a")]


async def test_untracked_ids_are_remembered_until_tracked_again(store: Store) -> None:
    await store.track(SRC, ["a", "b"], "cli", NOW)
    await store.untrack(SRC, ["a"], NOW + 1)
    assert await store.untracked(SRC, ["a", "b", "never-seen"]) == {"a"}
    assert await store.untracked("azure", ["a"]) == set()
    assert await store.track(SRC, ["a"], "cli", NOW + 2) == ["a"]
    assert await store.untracked(SRC, ["a"]) == set()


async def test_tracking_a_gone_batch_revives_it(store: Store) -> None:
    await store.track(SRC, ["gone", "final"], "config", NOW)
    known = Knowledge(status="in_progress", seen=frozenset({"validating", "in_progress"}), sequence=2)
    gone = await row(
        store, "gone", state=GONE, knowledge=known, not_found=3, error_streak=2, next_due=NOW + 99, finished_at=NOW + 5
    )
    final = await row(store, "final", state=FINAL, finished_at=NOW + 5)
    await store.record([Write(gone), Write(final)], NOW + 5)
    assert await store.track(SRC, ["gone", "final"], "cli", NOW + 10) == ["gone"]  # a final batch stays final
    revived = await store.batch(SRC, "gone")
    assert revived is not None
    assert (revived.state, revived.not_found, revived.error_streak, revived.next_due, revived.finished_at) == (
        ACTIVE,
        0,
        0,
        0.0,
        None,
    )
    assert revived.knowledge == known  # what it announced before is not announced again
    still_final = await store.batch(SRC, "final")
    assert still_final is not None
    assert still_final.state == FINAL


async def test_retracking_resumes_the_sequence_and_remembers_announced_statuses(store: Store) -> None:
    await enqueue(
        store, "a", event("a", 1, event_type="batch.validating"), event("a", 2, event_type="batch.in_progress")
    )
    await store.untrack(SRC, ["a"], NOW)
    assert await store.untracked(SRC, ["a", "b"]) == {"a"}
    assert await store.track(SRC, ["a"], "cli", NOW + 1) == ["a"]
    assert await store.untracked(SRC, ["a"]) == set()
    again = await store.batch(SRC, "a")
    assert again is not None
    assert again.knowledge.sequence == 2
    assert again.knowledge.seen == {"validating", "in_progress"}
    assert again.knowledge.status is None
    # The resumed sequence is the row's compare-and-set value too.
    moved = replace(again, raw=None, knowledge=replace(again.knowledge, sequence=3))
    assert (await store.record([Write(moved, [event("a", 3)], expected_sequence=2)], NOW + 2)).conflicts == ()


async def test_batches_filters_and_orders(store: Store) -> None:
    await store.track(SRC, ["b", "a"], "cli", NOW)
    await store.track(SRC, ["c"], "cli", NOW - 1)
    await store.track("azure", ["d"], "cli", NOW + 1)
    await store.record([Write(await row(store, "a", state=FINAL, finished_at=NOW))], NOW)
    assert [b.id for b in await store.batches()] == ["c", "a", "b", "d"]  # by added_at, then id
    assert [b.id for b in await store.batches(SRC, [ACTIVE])] == ["c", "b"]
    assert [b.id for b in await store.batches(states=[FINAL, GONE])] == ["a"]
    assert [b.id for b in await store.batches("azure", [FINAL])] == []


async def test_bodies_are_kept_and_only_read_when_asked(store: Store) -> None:
    await store.track(SRC, ["a", "b"], "cli", NOW)
    body = {"id": "a", "status": "in_progress", "metadata": {"team": "ml"}}
    await store.record([Write(await row(store, "a"), body=dump_body(body))], NOW)
    [a, b] = await store.batches(SRC)
    assert (a.raw, b.raw) == (None, None)  # the poll loop keeps only fingerprints
    assert a.fingerprint == fingerprint(dump_body(body))  # kept with the body: the same after a restart
    assert b.fingerprint is None  # never fetched
    [with_raw, _] = await store.batches(SRC, with_raw=True)
    assert with_raw.raw == body
    one = await store.batch(SRC, "a")
    assert one is not None
    assert one.raw == body

    await store.record([Write(await row(store, "a", updated_at=NOW + 1))], NOW + 1)  # body None keeps the stored one
    kept = await store.batch(SRC, "a")
    assert kept is not None
    assert (kept.raw, kept.fingerprint, kept.updated_at) == (body, a.fingerprint, NOW + 1)

    changed = body | {"status": "finalizing"}
    await store.record([Write(await row(store, "a"), body=dump_body(changed))], NOW + 2)
    after = await store.batch(SRC, "a")
    assert after is not None
    assert after.raw == changed
    assert after.fingerprint == fingerprint(dump_body(changed)) != a.fingerprint


async def test_save_schedule_persists_only_the_schedule(store: Store) -> None:
    await store.track(SRC, ["a"], "cli", NOW)
    held = await row(store, "a")
    changed = replace(
        held, next_due=NOW + 42, interval=17.5, error_streak=3, state=FINAL, knowledge=Knowledge(sequence=9)
    )
    await store.save_schedule([changed, replace(held, id="never-tracked")])
    saved = await store.batch(SRC, "a")
    assert saved is not None
    assert (saved.next_due, saved.interval, saved.error_streak) == (NOW + 42, 17.5, 3)
    assert (saved.state, saved.knowledge) == (ACTIVE, Knowledge())
    assert await store.batch(SRC, "never-tracked") is None


async def test_cursors_are_per_source_and_name(store: Store) -> None:
    assert await store.cursor(SRC, "discovery") is None
    await store.set_cursor(SRC, "discovery", "batch_1")
    await store.set_cursor("azure", "discovery", "batch_x")
    await store.set_cursor(SRC, "other", "42")
    await store.set_cursor(SRC, "discovery", "batch_2")
    assert await store.cursor(SRC, "discovery") == "batch_2"
    assert await store.cursor("azure", "discovery") == "batch_x"
    assert await store.cursor(SRC, "other") == "42"
    assert await store.cursor("azure", "other") is None


# -- record: batch rows + events + outbox in one transaction ---------------------------------------


async def test_record_writes_row_events_and_one_outbox_row_per_sink(store: Store) -> None:
    await store.track(SRC, ["a"], "cli", NOW)
    knowledge = Knowledge(status="in_progress", seen=frozenset({"validating", "in_progress"}), sequence=2)
    updated = await row(store, "a", knowledge=knowledge, next_due=NOW + 30, updated_at=NOW)
    body = {"id": "a", "status": "in_progress"}
    recorded = await store.record(
        [Write(updated, [event("a", 1, ["mqtt", "webhook"]), event("a", 2, ["mqtt"])], dump_body(body))], NOW
    )

    assert recorded.enqueued == 3
    assert recorded.conflicts == ()
    assert recorded.position == await store.last_position()
    saved = await store.batch(SRC, "a")
    assert saved is not None
    assert saved.knowledge == knowledge
    assert saved.raw == body
    assert saved.next_due == NOW + 30
    assert [e["data"]["sequence"] for e in await store.events_for(SRC, "a")] == [1, 2]
    assert [e["data"]["sequence"] for e in await store.events_for(None, "a")] == [1, 2]
    assert await store.events_for("azure", "a") == []
    assert sorted((d.sink, d.sequence) for d in await store.deliveries()) == [("mqtt", 1), ("mqtt", 2), ("webhook", 1)]


async def test_the_same_event_recorded_twice_is_enqueued_once(store: Store) -> None:
    first = event("a", 1, ["mqtt", "webhook"])
    assert await enqueue(store, "a", first) == 2
    assert (await store.record([Write(await row(store, "a"), [first])], NOW + 5)).enqueued == 0
    assert (await store.record([Write(await row(store, "a"), [first, event("a", 2)])], NOW + 6)).enqueued == 1
    assert len(await store.deliveries()) == 3
    assert len(await store.events_for(SRC, "a")) == 2

    await store.mark_delivered("mqtt", ["evt_a_1"], NOW + 7)  # not even once it was delivered
    assert (await store.record([Write(await row(store, "a"), [first])], NOW + 8)).enqueued == 0
    assert await heads(store) == [("a", 2)]


async def test_a_failing_record_writes_nothing(store: Store) -> None:
    await store.track(SRC, ["a", "b"], "cli", NOW)
    good = Write(await row(store, "a", state=FINAL, finished_at=NOW), [event("a", 1)])
    broken = NewEvent(
        id="evt_bad", type="batch.test", sequence=1, created_at=0, detected_at=0.0, payload=b"\xff", sinks=["mqtt"]
    )
    position = await store.last_position()
    with pytest.raises(ValueError):  # the payload is not UTF-8 JSON
        await store.record([good, Write(await row(store, "b"), [broken])], NOW)

    a = await store.batch(SRC, "a")
    assert a is not None
    assert a.state == ACTIVE
    assert await store.events_for(SRC, "a") == []
    assert await store.deliveries() == []
    assert await store.last_position() == position
    assert await enqueue(store, "c", event("c", 1)) == 1  # the store is usable afterwards


async def test_record_does_not_recreate_an_untracked_batch(store: Store) -> None:
    await store.track(SRC, ["a", "b"], "cli", NOW)
    stale, fresh = await row(store, "a"), await row(store, "b")
    await store.untrack(SRC, ["a"], NOW)
    recorded = await store.record(
        [Write(stale, [event("a", 1)], expected_sequence=0), Write(fresh, [event("b", 1)])], NOW
    )
    assert recorded.enqueued == 1  # b's event; a's went with its row
    assert recorded.conflicts == ()  # untracked is not a lost race
    assert await store.batch(SRC, "a") is None
    assert await store.events_for(SRC, "a") == []
    assert [d.event_id for d in await store.deliveries()] == ["evt_b_1"]


async def test_compare_and_set_on_the_expected_sequence(store_factory: StoreFactory) -> None:
    async with store_factory() as first, store_factory() as second:
        await first.track(SRC, ["a", "b"], "cli", NOW)
        mine, theirs = await row(first, "a"), await row(second, "a")
        entered = Knowledge(status="validating", seen=frozenset({"validating"}), sequence=1)

        won = await first.record(
            [
                Write(
                    replace(mine, knowledge=entered),
                    [event("a", 1, event_type="batch.validating")],
                    expected_sequence=0,
                )
            ],
            NOW,
        )
        assert (won.enqueued, won.conflicts) == (1, ())

        other = replace(entered, status="in_progress", seen=frozenset({"validating", "in_progress"}))
        lost = await second.record(
            [
                Write(replace(theirs, knowledge=other), [event("a", 1, event_id="evt_late")], expected_sequence=0),
                Write(await row(second, "b"), [event("b", 1)], expected_sequence=0),
            ],
            NOW + 1,
        )
        assert lost.conflicts == ((SRC, "a"),)
        assert lost.enqueued == 1  # the other write of the same call still applies
        stored = await second.batch(SRC, "a")
        assert stored is not None
        assert stored.knowledge == entered
        assert [e["id"] for e in await second.events_for(SRC, "a")] == ["evt_a_1"]

        # Reading again and expecting the current sequence wins; no expectation always applies.
        current = await row(second, "a")
        step = replace(current, knowledge=replace(other, sequence=2))
        assert (await second.record([Write(step, [event("a", 2)], expected_sequence=1)], NOW + 2)).conflicts == ()
        forced = replace(current, knowledge=Knowledge(status="failed", seen=frozenset({"failed"}), sequence=7))
        assert (await first.record([Write(forced)], NOW + 3)).conflicts == ()
        final = await first.batch(SRC, "a")
        assert final is not None
        assert final.knowledge.sequence == 7


# -- outbox heads ------------------------------------------------------------------------------------


async def test_claim_heads_returns_only_the_lowest_pending_sequence_per_batch(store: Store) -> None:
    await enqueue(store, "a", event("a", 1), event("a", 2), event("a", 3))
    await enqueue(store, "b", event("b", 1, ["mqtt", "webhook"]))
    await enqueue(store, "c", event("c", 4, ["webhook"]))

    assert sorted(await heads(store)) == [("a", 1), ("b", 1)]
    assert sorted(await heads(store, "webhook")) == [("b", 1), ("c", 4)]
    rows = await store.claim_heads("mqtt", NOW, set(), 100)
    assert all(json.loads(r.payload)["data"]["sequence"] == r.sequence for r in rows)
    assert {(r.sink, r.source, r.attempts, r.enqueued_at) for r in rows} == {("mqtt", SRC, 0, NOW)}
    assert await heads(store, "nobody") == []


async def test_claim_heads_come_oldest_first(store: Store) -> None:
    await enqueue(store, "late", event("late", 1), now=NOW + 10)
    await enqueue(store, "early", event("early", 1), now=NOW)
    await enqueue(store, "middle", event("middle", 1), now=NOW + 5)
    assert await heads(store, now=NOW + 20) == [("early", 1), ("middle", 1), ("late", 1)]


async def test_claim_heads_skips_busy_batches_and_respects_the_limit(store: Store) -> None:
    await enqueue(store, "a", event("a", 1), event("a", 2))
    await enqueue(store, "b", event("b", 1))
    assert await heads(store, busy={(SRC, "a")}) == [("b", 1)]
    assert sorted(await heads(store, busy={("azure", "a")})) == [("a", 1), ("b", 1)]  # busy is keyed by source too
    assert len(await store.claim_heads("mqtt", NOW, set(), 1)) == 1
    assert await heads(store, busy={(SRC, "a"), (SRC, "b")}) == []


async def test_the_same_batch_id_in_two_sources_is_two_queues(store: Store) -> None:
    await enqueue(store, "a", event("a", 1))
    await enqueue(store, "a", event("a", 1, event_id="evt_azure_a_1"), source="azure")
    rows = await store.claim_heads("mqtt", NOW, set(), 100)
    assert sorted((r.source, r.batch_id) for r in rows) == [("azure", "a"), (SRC, "a")]
    assert [r.source for r in await store.claim_heads("mqtt", NOW, {(SRC, "a")}, 100)] == ["azure"]


async def test_a_head_not_yet_due_blocks_its_batch(store: Store) -> None:
    await enqueue(store, "a", event("a", 1), event("a", 2))
    await enqueue(store, "b", event("b", 1))
    await store.mark_retry("mqtt", "evt_a_1", NOW + 60, "503 from broker", NOW)

    assert await heads(store, now=NOW) == [("b", 1)]  # a's second event must not overtake its first
    assert await store.next_ready_at("mqtt", set()) == 0.0  # b's head
    # With b in flight, the worker's next wake is a's retry, not a's second row queued behind it.
    assert await store.next_ready_at("mqtt", {(SRC, "b")}) == NOW + 60
    assert await store.next_ready_at("mqtt", {(SRC, "a"), (SRC, "b")}) is None
    assert await store.next_ready_at("nobody", set()) is None
    assert sorted(await heads(store, now=NOW + 60)) == [("a", 1), ("b", 1)]
    [delivery] = [d for d in await store.deliveries("mqtt") if d.event_id == "evt_a_1"]
    assert (delivery.attempts, delivery.next_attempt_at, delivery.last_error) == (1, NOW + 60, "503 from broker")
    [head] = await store.claim_heads("mqtt", NOW + 60, {(SRC, "b")}, 10)
    assert head.attempts == 1


async def test_delivered_dead_and_redelivered_heads(store: Store) -> None:
    await enqueue(store, "a", event("a", 1), event("a", 2), event("a", 3))

    await store.mark_delivered("mqtt", ["evt_a_1"], NOW + 1)
    assert await heads(store) == [("a", 2)]

    await store.mark_dead("mqtt", "evt_a_2", "400 rejected", NOW + 2)
    assert await heads(store) == [("a", 3)]
    dead = await store.deliveries("mqtt", states=("dead",))
    assert [(d.event_id, d.state, d.last_error) for d in dead] == [("evt_a_2", "dead", "400 rejected")]

    assert await store.redeliver("mqtt", None, NOW + 3) == 1
    assert await heads(store) == [("a", 2)]  # back in sequence order, ahead of 3
    assert await store.deliveries("mqtt", states=("dead",)) == []
    [again] = [d for d in await store.deliveries("mqtt") if d.event_id == "evt_a_2"]
    assert (again.state, again.attempts) == ("pending", 0)

    await store.mark_delivered("mqtt", ["evt_a_2", "evt_a_3"], NOW + 4)
    assert await heads(store) == []
    assert await store.redeliver("mqtt", "evt_a_1", NOW + 5) == 1  # one named delivered event can be replayed
    assert await heads(store) == [("a", 1)]
    assert await store.redeliver("mqtt", "evt_a_1", NOW + 6) == 0  # a pending row is not re-queued twice
    assert await store.redeliver(None, "no-such-event", NOW + 6) == 0


async def test_a_redelivered_event_goes_ahead_of_later_pending_ones(store: Store) -> None:
    await enqueue(store, "a", event("a", 1), event("a", 2), event("a", 3))
    await store.mark_delivered("mqtt", ["evt_a_1"], NOW + 1)
    assert await heads(store) == [("a", 2)]
    assert await store.redeliver("mqtt", "evt_a_1", NOW + 2) == 1
    assert await heads(store) == [("a", 1)]
    await store.mark_delivered("mqtt", ["evt_a_1"], NOW + 3)
    assert await heads(store) == [("a", 2)]


async def test_redeliver_without_a_sink_covers_every_sink(store: Store) -> None:
    await enqueue(store, "a", event("a", 1, ["mqtt", "webhook"]))
    await store.mark_dead("mqtt", "evt_a_1", "nope", NOW)
    await store.mark_dead("webhook", "evt_a_1", "nope", NOW)
    assert await store.redeliver("webhook", None, NOW + 1) == 1
    assert await heads(store, "mqtt") == []
    assert await store.redeliver(None, None, NOW + 2) == 1
    assert await heads(store, "mqtt") == [("a", 1)]
    assert await heads(store, "webhook") == [("a", 1)]


async def test_a_row_failing_after_an_earlier_one_was_redelivered_waits_its_turn(store: Store) -> None:
    await enqueue(store, "a", event("a", 1), event("a", 2))
    await store.mark_dead("mqtt", "evt_a_1", "400", NOW)
    assert await heads(store) == [("a", 2)]  # row 2 goes out (in flight now) ...
    assert await store.redeliver("mqtt", None, NOW + 1) == 1  # ... while the CLI re-queues row 1
    await store.mark_retry("mqtt", "evt_a_2", NOW + 2, "503", NOW + 1)  # then row 2 fails
    assert await heads(store, now=NOW + 10) == [("a", 1)]  # one head: the redelivered row, then row 2
    await store.mark_delivered("mqtt", ["evt_a_1"], NOW + 3)
    assert await heads(store, now=NOW + 10) == [("a", 2)]
    assert await store.next_ready_at("mqtt", set()) == NOW + 2  # row 2 keeps its retry time


async def test_sinks_progress_independently(store: Store) -> None:
    await enqueue(store, "a", event("a", 1, ["mqtt", "webhook"]), event("a", 2, ["mqtt", "webhook"]))
    await store.mark_delivered("mqtt", ["evt_a_1"], NOW)
    assert await heads(store, "mqtt") == [("a", 2)]
    assert await heads(store, "webhook") == [("a", 1)]


async def test_deliveries_list_rows_by_sink_and_state(store: Store) -> None:
    await enqueue(store, "a", event("a", 1, ["webhook", "mqtt"], event_type="batch.validating"), event("a", 2))
    await enqueue(store, "b", event("b", 1, ["mqtt"]), now=NOW + 1)
    await store.mark_delivered("mqtt", ["evt_a_1"], NOW + 2)
    await store.mark_dead("webhook", "evt_a_1", "410 gone", NOW + 2)

    assert [(d.sink, d.event_id) for d in await store.deliveries()] == [
        ("mqtt", "evt_a_2"),
        ("mqtt", "evt_b_1"),
        ("webhook", "evt_a_1"),
    ]
    assert [d.event_id for d in await store.deliveries("mqtt", states=("delivered",))] == ["evt_a_1"]
    [dead] = await store.deliveries("webhook")
    assert (dead.batch_id, dead.type, dead.sequence, dead.state, dead.attempts, dead.last_error) == (
        "a",
        "batch.validating",
        1,
        "dead",
        1,
        "410 gone",
    )
    assert len(await store.deliveries(states=ALL_STATES)) == 4


async def test_outbox_stats_count_pending_and_dead_per_sink(store: Store) -> None:
    assert await store.outbox_stats() == {}
    await enqueue(store, "a", event("a", 1), event("a", 2))
    await enqueue(store, "b", event("b", 1, ["mqtt", "webhook", "file"]), now=NOW + 5)
    await store.mark_dead("webhook", "evt_b_1", "400", NOW + 6)
    await store.mark_delivered("file", ["evt_b_1"], NOW + 6)
    await store.mark_delivered("mqtt", ["evt_a_1"], NOW + 6)
    assert await store.outbox_stats() == {
        "mqtt": {"pending": 2, "dead": 0, "oldest_pending": NOW},
        "webhook": {"pending": 0, "dead": 1, "oldest_pending": None},
    }


# -- prune -------------------------------------------------------------------------------------------


async def test_prune_removes_only_finished_batches_older_than_the_cutoff(store: Store) -> None:
    await store.track(SRC, ["old-final", "new-final", "old-gone", "active"], "cli", NOW - 10_000)
    await store.track("azure", ["old-final"], "cli", NOW - 10_000)
    body = {"id": "old-final", "status": "completed"}
    await store.record(
        [
            Write(await row(store, "old-final", state=FINAL, finished_at=NOW - 5_000), body=dump_body(body)),
            Write(await row(store, "new-final", state=FINAL, finished_at=NOW - 10)),
            Write(await row(store, "old-gone", state=GONE, finished_at=NOW - 6_000)),
            Write(await row(store, "old-final", "azure", state=FINAL, finished_at=NOW - 5_000)),
        ],
        NOW,
    )
    assert [(b.source, b.id) for b in await store.prune(NOW - 1_000, "azure")] == [("azure", "old-final")]
    pruned = await store.prune(NOW - 1_000)
    assert sorted(b.id for b in pruned) == ["old-final", "old-gone"]
    assert next(b for b in pruned if b.id == "old-final").raw == body  # returned with its body
    assert sorted(b.id for b in await store.batches(SRC)) == ["active", "new-final"]
    assert await store.prune(NOW - 1_000) == []


async def test_prune_keeps_events_that_a_sink_still_owes(store: Store) -> None:
    await store.track(SRC, ["a"], "cli", NOW - 10_000)
    old = event("a", 1, detected_at=NOW - 9_000)
    await store.record([Write(await row(store, "a", state=FINAL, finished_at=NOW - 5_000), [old])], NOW - 9_000)
    await store.prune(NOW)
    assert await heads(store, now=NOW) == [("a", 1)]
    assert len(await store.events_for(SRC, "a")) == 1

    await store.mark_delivered("mqtt", ["evt_a_1"], NOW - 100)
    await store.prune(NOW)
    assert await store.deliveries(states=ALL_STATES) == []
    assert await store.events_for(SRC, "a") == []


async def test_prune_keeps_the_events_of_tracked_batches(store: Store) -> None:
    await enqueue(store, "a", event("a", 1, sinks=(), detected_at=NOW - 9_000))
    assert await store.prune(NOW) == []
    assert len(await store.events_for(SRC, "a")) == 1


async def test_a_prune_notice_is_recorded_for_a_forgotten_batch(store: Store) -> None:
    await store.track(SRC, ["a"], "cli", NOW - 10_000)
    await store.record(
        [Write(await row(store, "a", state=FINAL, finished_at=NOW - 5_000), [event("a", 1, detected_at=NOW - 9_000)])],
        NOW - 9_000,
    )
    await store.mark_delivered("mqtt", ["evt_a_1"], NOW - 8_000)
    [forgotten] = await store.prune(NOW)
    assert forgotten.key == (SRC, "a")
    assert await store.events_for(SRC, "a") == []

    notice = event("a", 2, ["mqtt", "webhook"], event_type="batch.pruned")
    assert await store.record_orphan(SRC, "a", notice, NOW) == 2
    assert await store.record_orphan(SRC, "a", notice, NOW + 1) == 0  # never enqueued twice
    assert await store.batch(SRC, "a") is None  # no row is recreated for it
    assert [e["type"] for e in await store.events_for(SRC, "a")] == ["batch.pruned"]
    assert await heads(store, "mqtt") == [("a", 2)]
    assert await heads(store, "webhook") == [("a", 2)]
    [logged] = await store.read_events(0, 100)  # the batch's earlier events were pruned
    assert (logged.source, logged.batch_id, logged.type, logged.payload) == (SRC, "a", "batch.pruned", notice.payload)

    # Tracked again, the batch resumes after the notice.
    await store.track(SRC, ["a"], "cli", NOW + 2)
    again = await store.batch(SRC, "a")
    assert again is not None
    assert again.knowledge.sequence == 2


# -- the event log -----------------------------------------------------------------------------------


async def test_read_events_from_a_position_with_filters(store: Store) -> None:
    assert await store.last_position() == 0
    assert await store.read_events(0, 10) == []
    await store.track(SRC, ["a", "b"], "cli", NOW)
    await store.track("azure", ["a"], "cli", NOW)
    written = [
        (SRC, "a", event("a", 1, event_type="batch.validating")),
        (SRC, "b", event("b", 1, event_type="batch.validating")),
        ("azure", "a", event("a", 1, event_type="batch.validating", event_id="evt_azure_a_1")),
        (SRC, "a", event("a", 2, event_type="batch.in_progress")),
    ]
    positions = []
    for source, batch_id, ev in written:
        recorded = await store.record([Write(await row(store, batch_id, source), [ev])], NOW)
        positions.append(recorded.position)
    assert positions == sorted(set(positions))  # strictly increasing
    assert await store.last_position() == positions[-1]

    logged = await store.read_events(0, 100)
    assert [(e.source, e.batch_id, e.type, e.payload) for e in logged] == [
        (s, b, ev.type, ev.payload) for s, b, ev in written
    ]
    assert [e.position for e in logged] == positions
    assert [e.position for e in await store.read_events(positions[0], 2)] == positions[1:3]
    assert await store.read_events(positions[-1], 100) == []

    def ids(events: list[LoggedEvent]) -> list[str]:
        return [json.loads(e.payload)["id"] for e in events]

    assert ids(await store.read_events(0, 100, sources=["azure"])) == ["evt_azure_a_1"]
    assert ids(await store.read_events(0, 100, batch_ids=["a"])) == ["evt_a_1", "evt_azure_a_1", "evt_a_2"]
    assert ids(await store.read_events(0, 100, types=["batch.in_progress"])) == ["evt_a_2"]
    assert ids(await store.read_events(0, 100, sources=[SRC], batch_ids=["a", "b"], types=["batch.validating"])) == [
        "evt_a_1",
        "evt_b_1",
    ]
    assert ids(await store.read_events(positions[1], 1, batch_ids=["a"])) == ["evt_azure_a_1"]


async def test_positions_never_repeat_after_pruning(store: Store) -> None:
    await store.track(SRC, ["a"], "cli", NOW - 10_000)
    await store.record(
        [
            Write(
                await row(store, "a", state=FINAL, finished_at=NOW - 5_000),
                [event("a", 1, (), detected_at=NOW - 9_000), event("a", 2, (), detected_at=NOW - 9_000)],
            )
        ],
        NOW - 9_000,
    )
    last = await store.last_position()
    await store.prune(NOW)
    assert await store.read_events(0, 100) == []
    assert await store.last_position() == last  # the high-water mark survives

    await enqueue(store, "b", event("b", 1))
    [fresh] = await store.read_events(0, 100)
    assert fresh.position > last


async def test_changes_yield_when_another_connection_commits(store_factory: StoreFactory) -> None:
    async with store_factory() as watcher, store_factory() as writer:
        changes = watcher.changes()
        waiting: asyncio.Future[None] | None = None
        try:
            for round_ in range(2):
                waiting = asyncio.ensure_future(anext(changes))
                deadline = time.monotonic() + 10
                # The watcher may still be taking its starting point: commit until it notices one.
                while not waiting.done():
                    assert time.monotonic() < deadline, "changes() did not yield after another connection's commit"
                    await writer.track(SRC, [f"from-writer-{round_}-{time.monotonic_ns()}"], "cli", NOW)
                    await asyncio.wait({waiting}, timeout=0.05)
                assert waiting.result() is None
            assert any(b.id.startswith("from-writer-1-") for b in await watcher.batches(SRC))  # and sees it
        finally:
            if waiting is not None and not waiting.done():
                waiting.cancel()
                await asyncio.wait({waiting})
            await changes.aclose()  # type: ignore[attr-defined]


# -- leases ------------------------------------------------------------------------------------------


async def test_a_source_lease_has_one_holder_until_it_expires(store_factory: StoreFactory) -> None:
    async with store_factory() as one, store_factory() as two:
        assert await one.acquire_leases("r1", ["openai", "azure"], NOW, 30) == ["openai", "azure"]
        assert await two.acquire_leases("r2", ["openai", "azure", "gemini"], NOW + 1, 30) == ["gemini"]
        assert await one.acquire_leases("r1", ["openai"], NOW + 20, 30) == ["openai"]  # renewed
        assert await two.acquire_leases("r2", ["openai", "azure"], NOW + 31, 30) == ["azure"]  # azure lapsed
        assert await one.leases() == {
            "azure": ("r2", NOW + 61),
            "gemini": ("r2", NOW + 31),
            "openai": ("r1", NOW + 50),
        }


async def test_released_leases_are_free_at_once(store: Store) -> None:
    await store.acquire_leases("r1", ["openai", "azure"], NOW, 30)
    await store.acquire_leases("r2", ["gemini"], NOW, 30)
    await store.release_leases("r1", ["azure"])
    assert await store.acquire_leases("r2", ["azure"], NOW + 1, 30) == ["azure"]
    await store.release_leases("r1")  # all of r1's
    await store.release_leases("r1")  # releasing nothing held is fine
    assert sorted(await store.leases()) == ["azure", "gemini"]
    assert await store.acquire_leases("r3", ["openai"], NOW + 1, 30) == ["openai"]


async def test_replicas_racing_for_a_lease_get_it_once(store_factory: StoreFactory) -> None:
    async with store_factory() as one, store_factory() as two:
        won = await asyncio.gather(
            *(s.acquire_leases(f"r{i}", ["openai"], NOW, 30) for i, s in enumerate([one, two, one, two]))
        )
        assert sum(len(w) for w in won) == 1


# -- knowledge ---------------------------------------------------------------------------------------


def real_knowledge() -> Knowledge:
    """Knowledge as detection builds it, with every field populated."""
    policy = Policy(progress_interval=1.0, stall_after=10.0, expiry_warning=10_000.0)
    known = Knowledge()
    for now, done in [(NOW, 1), (NOW + 5, 2), (NOW + 20, 2)]:
        snap = make_snapshot(
            "in_progress",
            "a",
            endpoint="/v1/embeddings",
            expires_at=int(NOW) + 5_000,
            request_counts={"completed": done, "failed": 1, "total": 9},
        )
        known = detect(known, snap, now, policy).knowledge
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
                counts=Counts(total=10, completed=5, failed=1),
                counts_changed_at=NOW - 12.5,
                progress_counts=Counts(total=10, completed=4, failed=1),
                progress_at=NOW - 30.25,
                stalled_at_counts=Counts(total=10, completed=5, failed=1),
                expiring_sent=True,
            ),
            id="every-field",
        ),
        pytest.param(real_knowledge(), id="from-detection"),
    ],
)
async def test_knowledge_round_trips(store_factory: StoreFactory, knowledge: Knowledge) -> None:
    async with store_factory() as first:
        await first.track(SRC, ["a"], "cli", NOW)
        await first.record([Write(await row(first, "a", knowledge=knowledge))], NOW)
    async with store_factory() as reopened:
        saved = await reopened.batch(SRC, "a")
        assert saved is not None
        assert saved.knowledge == knowledge
        [listed] = await reopened.batches(SRC)
        assert listed.knowledge == knowledge


def test_real_knowledge_has_every_field() -> None:
    known = real_knowledge()
    assert known.progress_counts is not None
    assert known.stalled_at_counts is not None
    assert known.expiring_sent
