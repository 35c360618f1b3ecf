"""The in-memory tracker: scheduling after a poll or an error, gone batches, and list-vs-retrieve planning."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from poller.domain.events import build_event, decode
from poller.domain.schedule import Intervals
from poller.domain.snapshot import Snapshot
from poller.domain.transitions import Policy
from poller.errors import ApiError
from poller.metrics import Metrics
from poller.polling.recorder import Recorder
from poller.polling.tracker import Backoff, Observation, Tracker
from poller.store import ACTIVE, FINAL, GONE, TrackedBatch, open_store
from poller.store.codec import dump_body, fingerprint
from tests.helpers import make_snapshot, openai_adapter

SOURCE = "openai"
T0 = 1_700_000_000
NOW = float(T0 + 1_000)
BASE = {"validating": 10.0, "in_progress": 30.0, "finalizing": 10.0, "cancelling": 10.0}
SEED = 1234


class Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def routed(event_type: str, metadata: object, source: str) -> list[str]:
    sinks = ["stdout"]
    if isinstance(metadata, dict) and metadata.get("team") == "ml":
        sinks.append("mqtt")
    return sinks


def make_tracker(rand: random.Random | None = None, ids: tuple[str, ...] = ("batch_a",)) -> Tracker:
    tracker = Tracker(
        SOURCE,
        intervals=Intervals(base=BASE, growth=2.0, max_interval=300.0),
        policy=Policy(),
        backoff=Backoff(base=5.0, cap=600.0, gone_after=3),
        rand=(rand or random.Random(SEED)).random,
    )
    tracker.load(TrackedBatch(source=SOURCE, id=i, origin="cli", added_at=0.0) for i in ids)
    tracker.listable = False  # retrieve-only: paced by the per-status intervals (walks: see below)
    return tracker


def observe(tracker: Tracker, snap: Snapshot, now: float) -> Observation | None:
    """What the refresher does with a fetched snapshot."""
    return tracker.observe(snap, dump_body(snap.raw), now)


# -- observe -----------------------------------------------------------------------------------------


def test_first_observation_records_the_event_and_schedules_at_the_status_base() -> None:
    tracker = make_tracker()
    snap = make_snapshot("validating", metadata={"team": "ml"})
    observation = observe(tracker, snap, NOW)

    assert observation is not None
    assert observation.snapshot is snap
    row = observation.row
    assert row is not None
    assert row.id == "batch_a"
    assert row.state == ACTIVE
    assert row.next_due == NOW + BASE["validating"]
    assert row.created_at == T0
    assert row.knowledge.status == "validating"
    assert row.knowledge.sequence == 1
    assert [c.type for c in observation.changes] == ["batch.validating"]
    assert observation.changes[0].sequence == 1
    assert observation.body == dump_body(snap.raw)
    assert observation.expected_sequence == 0
    assert observation.warning is None
    assert tracker.due(NOW + 9.9) == []
    assert [b.id for b in tracker.due(NOW + 10.0)] == ["batch_a"]


async def test_an_observation_becomes_routed_durable_events(tmp_path: Path) -> None:
    """Tracker and recorder together: the events the store keeps are the changes' events, routed by metadata."""
    tracker = make_tracker()
    snap = make_snapshot("in_progress", metadata={"team": "ml"}, in_progress_at=T0 + 10)
    async with open_store(tmp_path / "state.db") as store:
        await store.track(SOURCE, ["batch_a"], "cli", NOW)
        tracker.load(await store.batches(SOURCE))
        observation = observe(tracker, snap, NOW)
        assert observation is not None
        recorder = Recorder(store, routed, Metrics())

        recorded = await recorder.record(SOURCE, "openai", [observation], NOW)

        assert recorded.conflicts == ()
        assert recorded.enqueued == 4  # two events, two sinks each
        logged = await store.read_events(0, 10)
        expected = [build_event(SOURCE, "openai", snap, c, NOW) for c in observation.changes]
        assert [decode(e.payload) for e in logged] == expected
        assert [e.type for e in expected] == ["batch.validating", "batch.in_progress"]
        deliveries = await store.deliveries(states=("pending",))
        assert sorted((d.sink, d.sequence) for d in deliveries) == [
            ("mqtt", 1),
            ("mqtt", 2),
            ("stdout", 1),
            ("stdout", 2),
        ]
        stored = await store.batch(SOURCE, "batch_a")
        assert stored is not None
        assert observation.row is not None
        assert stored.knowledge == observation.row.knowledge
        assert stored.knowledge.sequence == 2
        assert stored.raw == dict(snap.raw)

        # a second write of the same observation finds the sequence moved on: a conflict, nothing enqueued twice
        again = await recorder.record(SOURCE, "openai", [observation], NOW + 1)
        assert again.conflicts == ((SOURCE, "batch_a"),)
        assert again.enqueued == 0


async def test_after_a_restart_the_stored_fingerprint_still_tells_an_unchanged_body(tmp_path: Path) -> None:
    """The store keeps the body's fingerprint, not the body, for the poll loop: it must be the one
    `observe` computes in any process (`hash` of a str is salted per process)."""
    snap = make_snapshot("in_progress", request_counts={"completed": 1, "failed": 0, "total": 9})
    async with open_store(tmp_path / "state.db") as store:
        await store.track(SOURCE, ["batch_a"], "cli", NOW)
        first = make_tracker(ids=())
        first.load(await store.batches(SOURCE))
        observation = observe(first, snap, NOW)
        assert observation is not None
        assert observation.body is not None
        await Recorder(store, routed, Metrics()).record(SOURCE, "openai", [observation], NOW)

        restarted = make_tracker(ids=())
        restarted.load(await store.batches(SOURCE))
        [loaded] = restarted.batches.values()
        assert loaded.raw is None
        assert loaded.fingerprint == fingerprint(dump_body(snap.raw))
        again = observe(restarted, snap, NOW + 30)
        assert again is not None
        assert (again.row, again.body, again.changes) == (None, None, [])  # nothing to write


def test_unchanged_batch_gives_no_update_and_backs_off() -> None:
    tracker = make_tracker()
    snap = make_snapshot("in_progress", request_counts={"completed": 1, "failed": 0, "total": 9})
    observe(tracker, snap, NOW)

    intervals = []
    now = NOW
    for _ in range(6):
        now = tracker.batches["batch_a"].next_due
        observation = observe(tracker, snap, now)
        assert observation is not None
        assert observation.row is None
        assert observation.changes == []
        intervals.append(tracker.batches["batch_a"].next_due - now)
    assert intervals == [60.0, 120.0, 240.0, 300.0, 300.0, 300.0]  # base 30, x2 per quiet poll, cap 300


def test_a_change_resets_the_interval_to_the_new_status_base() -> None:
    tracker = make_tracker()
    observe(tracker, make_snapshot("validating"), NOW)
    observe(tracker, make_snapshot("validating"), NOW + 10)
    observe(tracker, make_snapshot("validating"), NOW + 30)
    assert tracker.batches["batch_a"].interval == 40.0

    observation = observe(tracker, make_snapshot("in_progress", in_progress_at=T0 + 1_050), NOW + 70)
    assert observation is not None
    assert observation.row is not None
    assert [c.type for c in observation.changes] == ["batch.in_progress"]
    assert observation.expected_sequence == 1  # the write must find the row as the first poll left it
    assert tracker.batches["batch_a"].next_due == NOW + 70 + BASE["in_progress"]


def test_final_batch_is_marked_final_and_never_due_again() -> None:
    tracker = make_tracker()
    observe(tracker, make_snapshot("in_progress"), NOW)
    done = make_snapshot("completed", finalizing_at=T0 + 1_010, completed_at=T0 + 1_020)
    observation = observe(tracker, done, NOW + 30)

    assert observation is not None
    row = observation.row
    assert row is not None
    assert row.state == FINAL
    assert row.finished_at == NOW + 30
    assert [c.type for c in observation.changes] == ["batch.finalizing", "batch.completed"]
    assert math.isinf(tracker.batches["batch_a"].next_due)
    assert tracker.due(NOW + 10**9) == []
    assert tracker.active() == []
    assert observe(tracker, done, NOW + 60) is None


def test_update_is_a_copy_not_the_live_record() -> None:
    tracker = make_tracker()
    observation = observe(tracker, make_snapshot("validating"), NOW)
    assert observation is not None
    assert observation.row is not None
    row = observation.row
    observe(tracker, make_snapshot("in_progress"), NOW + 10)
    assert row.knowledge.status == "validating"


def test_batches_created_in_the_same_second_share_their_stamps() -> None:
    # One int object per stamp for a page's batches (a list page holds batches created seconds apart).
    tracker = make_tracker(ids=("batch_a", "batch_b"))
    created, expires = T0 + 300, T0 + 300 + 86_400
    a, b = (
        make_snapshot("validating", batch_id, created_at=int(str(created)), expires_at=int(str(expires)))
        for batch_id in ("batch_a", "batch_b")
    )
    assert a.created_at is not b.created_at  # each parsed on its own
    observe(tracker, a, NOW)
    observe(tracker, b, NOW)
    row_a, row_b = tracker.batches["batch_a"], tracker.batches["batch_b"]
    assert (row_a.created_at, row_a.expires_at) == (created, expires)
    assert row_a.created_at is row_b.created_at
    assert row_a.expires_at is row_b.expires_at


def test_untracked_batch_is_ignored() -> None:
    tracker = make_tracker()
    assert observe(tracker, make_snapshot("validating", batch_id="batch_unknown"), NOW) is None


def test_stale_snapshot_warns_and_writes_nothing() -> None:
    tracker = make_tracker()
    observe(tracker, make_snapshot("in_progress"), NOW)
    observation = observe(tracker, make_snapshot("validating"), NOW + 30)
    assert observation is not None
    assert observation.row is None
    assert observation.changes == []
    assert observation.warning
    assert tracker.batches["batch_a"].knowledge.status == "in_progress"


def test_a_change_with_an_unchanged_body_keeps_the_stored_body() -> None:
    """A stall is detected from time alone: the row and event are written, the body is not rewritten."""
    tracker = make_tracker()
    snap = make_snapshot("in_progress", request_counts={"completed": 1, "failed": 0, "total": 9})
    observe(tracker, snap, NOW)
    observation = observe(tracker, snap, NOW + Policy().stall_after)
    assert observation is not None
    assert observation.row is not None
    assert [c.type for c in observation.changes] == ["batch.stalled"]
    assert observation.body is None


def test_recovering_from_errors_writes_the_reset_row_even_when_nothing_changed() -> None:
    tracker = make_tracker()
    snap = make_snapshot("in_progress")
    observe(tracker, snap, NOW)
    tracker.failed("batch_a", ApiError("boom", status=500), NOW + 1, counts_as_gone=False)
    assert tracker.batches["batch_a"].error_streak == 1
    observation = observe(tracker, snap, NOW + 30)
    assert observation is not None
    assert observation.row is not None
    assert observation.row.error_streak == 0
    assert observation.changes == []
    assert observation.body is None


# -- failed ------------------------------------------------------------------------------------------


def test_not_found_gone_after_times_marks_the_batch_gone() -> None:
    tracker = make_tracker()
    observe(tracker, make_snapshot("in_progress"), NOW)
    missing = ApiError("no such batch", status=404)

    assert tracker.failed("batch_a", missing, NOW + 30, counts_as_gone=True) is None
    assert tracker.failed("batch_a", missing, NOW + 60, counts_as_gone=True) is None
    assert tracker.batches["batch_a"].state == ACTIVE
    row = tracker.failed("batch_a", missing, NOW + 90, counts_as_gone=True)

    assert row is not None
    assert row.state == GONE
    assert row.finished_at == NOW + 90
    assert row is not tracker.batches["batch_a"]  # a copy to write
    assert tracker.due(NOW + 10**9) == []
    assert tracker.failed("batch_a", missing, NOW + 120, counts_as_gone=True) is None


def test_a_404_that_does_not_count_only_backs_off() -> None:
    """A 404 while the API does not otherwise answer properly says nothing about the batch."""
    tracker = make_tracker(rand=Fixed(0.5))
    missing = ApiError("no such batch", status=404)
    for i in range(10):
        assert tracker.failed("batch_a", missing, NOW + i, counts_as_gone=False) is None
    batch = tracker.batches["batch_a"]
    assert batch.state == ACTIVE
    assert batch.not_found == 0
    assert batch.error_streak == 10
    assert batch.next_due == pytest.approx(NOW + 9 + 0.5 * 600.0)


def test_a_successful_poll_resets_the_not_found_count() -> None:
    tracker = make_tracker()
    missing = ApiError("no such batch", status=404)
    tracker.failed("batch_a", missing, NOW, counts_as_gone=True)
    tracker.failed("batch_a", missing, NOW + 1, counts_as_gone=True)
    observe(tracker, make_snapshot("in_progress"), NOW + 2)
    tracker.failed("batch_a", missing, NOW + 3, counts_as_gone=True)
    tracker.failed("batch_a", missing, NOW + 4, counts_as_gone=True)
    assert tracker.batches["batch_a"].state == ACTIVE


@pytest.mark.parametrize("status", [500, 503, None, 400, 401])
@pytest.mark.parametrize("counts_as_gone", [True, False])
def test_other_errors_back_off_with_full_jitter(status: int | None, counts_as_gone: bool) -> None:
    tracker = make_tracker()
    reference = random.Random(SEED)
    error = ApiError("boom", status=status)
    now = NOW
    for streak in range(1, 9):
        assert tracker.failed("batch_a", error, now, counts_as_gone=counts_as_gone) is None
        ceiling = min(600.0, 5.0 * 2 ** (streak - 1))
        assert tracker.batches["batch_a"].next_due == pytest.approx(now + reference.random() * ceiling)
        assert tracker.batches["batch_a"].state == ACTIVE
        now += 1000


@pytest.mark.parametrize(
    ("draw", "retry_after", "expected_delay"),
    [
        pytest.param(0.999, 120.0, 120.0, id="floor-above-jitter"),
        pytest.param(0.0, 2.0, 2.0, id="floor-with-zero-jitter"),
        pytest.param(0.8, 1.0, 4.0, id="jitter-above-floor"),
    ],
)
def test_retry_after_is_a_floor(draw: float, retry_after: float, expected_delay: float) -> None:
    tracker = make_tracker(rand=Fixed(draw))
    tracker.failed("batch_a", ApiError("slow down", status=429, retry_after=retry_after), NOW, counts_as_gone=False)
    assert tracker.batches["batch_a"].next_due == pytest.approx(NOW + expected_delay)


def test_a_pause_defers_every_active_batch_and_hurry_undoes_it() -> None:
    """`failed(not_before=)` became `defer_all`: a pause (rejected credentials) holds every batch back."""
    tracker = make_tracker(rand=Fixed(0.5), ids=("a", "b"))
    tracker.failed("a", ApiError("down", status=502), NOW, counts_as_gone=False)
    tracker.batches["b"].next_due = NOW + 2000
    tracker.defer_all(NOW + 999)
    assert tracker.batches["a"].next_due == NOW + 999
    assert tracker.batches["b"].next_due == NOW + 2000  # never pulled in
    assert tracker.due(NOW + 998) == []
    tracker.hurry(NOW + 5)
    assert [b.id for b in tracker.due(NOW + 5)] == ["a", "b"]


def test_load_keeps_the_schedule_of_batches_already_known() -> None:
    tracker = make_tracker(ids=("a", "b"))
    tracker.batches["a"].next_due = NOW + 77
    tracker.load(
        [
            TrackedBatch(source=SOURCE, id="a", origin="cli", added_at=0.0),
            TrackedBatch(source="other", id="x", origin="cli", added_at=0.0),
            TrackedBatch(source=SOURCE, id="c", origin="cli", added_at=0.0),
        ]
    )
    assert sorted(tracker.batches) == ["a", "c"]  # b left, another source's row is not ours
    assert tracker.batches["a"].next_due == NOW + 77


def test_due_lists_most_overdue_first() -> None:
    tracker = make_tracker(ids=("a", "b", "c", "d"))
    for batch_id, due in {"a": 50.0, "b": 10.0, "c": 30.0, "d": 500.0}.items():
        tracker.batches[batch_id].next_due = due
    assert [b.id for b in tracker.due(100.0)] == ["b", "c", "a"]
    assert tracker.next_due() == 10.0


# -- list pages or retrieves -------------------------------------------------------------------------


def tracker_with_created(created: list[int]) -> Tracker:
    tracker = make_tracker(ids=())
    tracker.load(
        TrackedBatch(source=SOURCE, id=f"b{i}", origin="discover", added_at=0.0, created_at=c)
        for i, c in enumerate(created)
    )
    return tracker


def test_many_recent_due_batches_prefer_list_pages() -> None:
    tracker = tracker_with_created([T0 + i for i in range(1000)])
    due = list(tracker.batches.values())
    assert 10 <= tracker.pages_needed(min(b.created_at or 0 for b in due)) <= 11
    assert tracker.plan_walk(due) is not None


def test_few_due_batches_are_retrieved() -> None:
    tracker = tracker_with_created([T0 + i for i in range(1000)])
    oldest, newest = tracker.batches["b0"], tracker.batches["b999"]
    assert tracker.plan_walk([oldest, newest]) is None  # ~10 pages to reach the oldest > 2 retrieves
    assert tracker.plan_walk([newest]) is None


def test_a_few_of_the_newest_fit_on_one_page() -> None:
    tracker = tracker_with_created([T0 + i for i in range(1000)])
    due = [tracker.batches[f"b{i}"] for i in (999, 998, 997)]
    assert tracker.pages_needed(T0 + 997) == 1
    assert tracker.plan_walk(due) is not None


def test_never_seen_batches_are_walked_only_when_a_fruitless_walk_stays_cheap() -> None:
    tracker = tracker_with_created([T0 + i for i in range(1000)])

    def unplaced(n: int) -> list[TrackedBatch]:
        return [TrackedBatch(source=SOURCE, id=f"x{i}", origin="cli", added_at=0.0) for i in range(n)]

    # 50 never-seen batches fit on one page: walk up to 2 pages, with no created_at to stop at.
    assert tracker.plan_walk(unplaced(50)) == (None, 2)
    # 3 never-seen batches: even one page plus the retrieves after a miss costs more than 3 retrieves.
    assert tracker.plan_walk(unplaced(3)) is None
    # Mixed with a placed batch deep in the list, the budget covers reaching it.
    deep = tracker.batches["b0"]
    plan = tracker.plan_walk([*unplaced(50), deep])
    assert plan is not None
    stop_before, pages = plan
    assert stop_before is None
    assert pages >= tracker.pages_needed(T0)


@pytest.mark.parametrize(
    ("oldest", "pages"),
    [
        pytest.param(T0 + 950, 1, id="newer-than-first-page-end"),
        pytest.param(T0 + 900, 1, id="on-first-page-end"),
        pytest.param(T0 + 850, 2, id="second-page"),
        pytest.param(T0 + 700, 3, id="last-known-page-end"),
    ],
)
def test_pages_needed_uses_the_last_walk(oldest: int, pages: int) -> None:
    tracker = tracker_with_created([T0 + i for i in range(1000)])
    tracker.learn_walk([T0 + 900, T0 + 800, T0 + 700], items=300, tracked_seen=300, page_work=0.01)
    assert tracker.pages_needed(oldest) == pages


@pytest.mark.parametrize(("count", "expected"), [(9, False), (10, False), (11, True)])
def test_list_only_when_strictly_fewer_requests(count: int, expected: bool) -> None:
    """Reaching the oldest of 1000 takes 10 pages: worth it only for more than 10 due batches."""
    tracker = tracker_with_created([T0 + i for i in range(1000)])
    due = [tracker.batches[f"b{i}"] for i in range(count)]
    assert tracker.pages_needed(T0) == 10
    assert (tracker.plan_walk(due) is not None) is expected


# -- walks: one period for every batch a walk shows ----------------------------------------------------


def listable_tracker(n: int, latency: float = 15.0, rate: float = 10.0) -> Tracker:
    tracker = tracker_with_created([T0 + i for i in range(n)])
    tracker.listable, tracker.latency, tracker.rate = True, latency, rate
    tracker.period = tracker.walk_period()
    return tracker


def test_every_batch_seen_in_a_walk_is_dated_from_the_walk_start() -> None:
    tracker = listable_tracker(250)  # 3 pages
    tracker.begin_walk(NOW)
    assert tracker.period == pytest.approx(15.0 * (1 + math.log10(3)))
    for i in range(250):  # pages read one after the other, later and later
        snap = make_snapshot("in_progress", f"b{i}", created_at=T0 + i)
        observe_listed(tracker, snap, NOW + 0.01 * (250 - i))
    assert {b.next_due for b in tracker.active()} == {NOW + tracker.period}


def test_a_walk_spaces_its_pages_by_the_slowest_of_the_last_few_walks() -> None:
    tracker = listable_tracker(100_000, latency=7.5, rate=100.0)
    tracker.begin_walk(NOW)
    assert (tracker.period, tracker.walk_pages) == (pytest.approx(30.0), 1000)
    assert tracker.page_spacing() == 0.0  # no walk known: as fast as the API allows
    marks = [T0 + 100_000 - 100 * (k + 1) for k in range(1000)]
    for work in (0.016, 0.012, 0.013, 0.011):
        tracker.learn_walk(marks, 100_000, 100_000, work)
    assert tracker.page_spacing() == pytest.approx(1.25 * 0.016)  # 1,000 pages over 20 s
    tracker.learn_walk(marks, 100_000, 100_000, 0.011)  # the 16 ms walk is out of the window now
    assert tracker.page_spacing() == pytest.approx(1.25 * 0.013)
    tracker.clear()
    assert tracker.page_spacing() == pytest.approx(0.0)


def observe_listed(tracker: Tracker, snap: Snapshot, now: float) -> Observation | None:
    return tracker.observe(snap, dump_body(snap.raw), now, listed=True)


def test_a_straggler_pulls_every_batch_due_before_the_next_walk_into_one_walk() -> None:
    tracker = listable_tracker(1000)
    for batch in tracker.active():
        batch.next_due = NOW + 10.0  # the walk group, due in 10 s
    tracker.batches["b999"].next_due = NOW  # one retrieved on its own, due now
    due = tracker.due(NOW)
    assert [b.id for b in due] == ["b999"]
    pulled = tracker.pull_in(due, NOW)
    assert len(pulled) == 1000
    assert tracker.plan_walk(pulled) is not None


def test_far_batches_are_not_pulled_in() -> None:
    tracker = listable_tracker(10)
    for batch in tracker.active():
        batch.next_due = NOW + 10 * tracker.period
    tracker.batches["b9"].next_due = NOW
    assert [b.id for b in tracker.pull_in(tracker.due(NOW), NOW)] == ["b9"]


def test_a_retrieved_batch_of_a_listable_source_joins_the_next_walk() -> None:
    tracker = listable_tracker(10)
    tracker.begin_walk(NOW)
    snap = make_snapshot("in_progress", "b3", created_at=T0 + 3)
    tracker.observe(snap, dump_body(snap.raw), NOW + 2, listed=False)
    assert tracker.batches["b3"].next_due == NOW + tracker.period


@pytest.mark.parametrize(
    ("batches", "latency", "rate", "period"),
    [
        pytest.param(100, 15.0, 10.0, 15.0, id="one-page"),
        pytest.param(1_000, 15.0, 10.0, 30.0, id="ten-pages"),
        pytest.param(10_000, 15.0, 10.0, 45.0, id="hundred-pages"),
        pytest.param(10_000, 15.0, 1.0, 125.0, id="rate-limited"),
    ],
)
def test_walk_period_follows_the_pages_holding_active_batches(
    batches: int, latency: float, rate: float, period: float
) -> None:
    tracker = listable_tracker(batches, latency, rate)
    assert tracker.walk_period() == pytest.approx(period)


# -- retrieve-only batches: paced by their estimated completion and expiry -----------------------------


def counts(done: int, total: int = 100) -> dict[str, int]:
    return {"completed": done, "failed": 0, "total": total}


def test_a_retrieve_only_batch_far_from_completion_is_polled_less_often() -> None:
    tracker = make_tracker()
    observe(tracker, make_snapshot("in_progress", request_counts=counts(0, 1000)), NOW)
    observe(tracker, make_snapshot("in_progress", request_counts=counts(10, 1000)), NOW + 30)
    delay = tracker.batches["batch_a"].next_due - (NOW + 30)
    assert delay > BASE["in_progress"]  # ~2,970 s to go: half of it, capped at max_interval
    assert delay <= 300.0


def test_a_retrieve_only_batch_is_polled_at_its_estimated_completion() -> None:
    tracker = make_tracker()
    tracker.latency = 2.0
    observe(tracker, make_snapshot("in_progress", request_counts=counts(0)), NOW)
    observe(tracker, make_snapshot("in_progress", request_counts=counts(90)), NOW + 90)
    delay = tracker.batches["batch_a"].next_due - (NOW + 90)
    assert 2.0 <= delay < BASE["in_progress"]  # ~10 s to go at 1 request/s


def test_a_retrieve_only_batch_is_polled_right_after_it_expires() -> None:
    tracker = make_tracker()
    snap = make_snapshot("in_progress", request_counts=counts(1), expires_at=int(NOW) + 5)
    observe(tracker, snap, NOW)
    assert tracker.batches["batch_a"].next_due == pytest.approx(NOW + 15.0)  # max(latency, 5 + 1)
    tracker.latency = 1.0
    observe(tracker, make_snapshot("in_progress", request_counts=counts(2), expires_at=int(NOW) + 5), NOW + 1)
    assert tracker.batches["batch_a"].next_due == pytest.approx(NOW + 6.0)


# -- the fast path: an unchanged body skips detection ---------------------------------------------------


def test_an_unchanged_body_skips_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = make_tracker()
    snap = make_snapshot("in_progress", request_counts=counts(5))
    observe(tracker, snap, NOW)
    knowledge = tracker.batches["batch_a"].knowledge

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("detect called for an unchanged body")

    monkeypatch.setattr("poller.polling.tracker.detect", boom)
    observation = observe(tracker, snap, NOW + 30)
    assert observation is not None
    assert observation.row is None
    assert observation.changes == []
    assert tracker.batches["batch_a"].knowledge is knowledge


def test_an_unchanged_body_still_reports_a_stall_and_expiry() -> None:
    tracker = make_tracker()
    snap = make_snapshot("in_progress", request_counts=counts(5), expires_at=int(NOW) + 100_000)
    observe(tracker, snap, NOW)
    stalled = observe(tracker, snap, NOW + Policy().stall_after)
    assert stalled is not None
    assert [c.type for c in stalled.changes] == ["batch.stalled"]
    expiring = observe(tracker, snap, NOW + 100_000 - Policy().expiry_warning)
    assert expiring is not None
    assert [c.type for c in expiring.changes] == ["batch.expiring"]


def test_an_unchanged_body_still_reports_progress_held_back_by_the_progress_interval() -> None:
    tracker = make_tracker()
    observe(tracker, make_snapshot("in_progress", request_counts=counts(1)), NOW)
    first = observe(tracker, make_snapshot("in_progress", request_counts=counts(2)), NOW + 100)
    assert first is not None
    assert [c.type for c in first.changes] == ["batch.progress"]
    held = observe(tracker, make_snapshot("in_progress", request_counts=counts(3)), NOW + 110)
    assert held is not None
    assert held.changes == []
    later = observe(tracker, make_snapshot("in_progress", request_counts=counts(3)), NOW + 200)
    assert later is not None
    assert [c.type for c in later.changes] == ["batch.progress"]


# -- list items vouched unchanged (no validation, no detection) ---------------------------------------


def test_a_list_item_equal_to_the_body_seen_last_is_vouched_unchanged() -> None:
    tracker = make_tracker()
    snap = make_snapshot("in_progress", request_counts=counts(3))
    observe(tracker, snap, NOW)
    assert tracker.unchanged("batch_a", dict(snap.raw), NOW + 1) == snap.created_at
    moved = dict(snap.raw) | {"request_counts": counts(4)}
    assert tracker.unchanged("batch_a", moved, NOW + 1) is None  # another body: validated and detected
    assert tracker.unchanged("batch_b", dict(snap.raw), NOW + 1) is None  # not tracked
    tracker.seen_unchanged("batch_a", NOW + 1)
    assert tracker.batches["batch_a"].next_due > NOW + 1


def test_nothing_is_vouched_while_a_time_based_event_is_due() -> None:
    tracker = make_tracker()
    snap = make_snapshot("in_progress", request_counts=counts(3))
    observe(tracker, snap, NOW)
    stall = Policy().stall_after
    assert tracker.unchanged("batch_a", dict(snap.raw), NOW + 60) is not None
    assert tracker.unchanged("batch_a", dict(snap.raw), NOW + stall + 1) is None  # batch.stalled is due
    waiting = make_tracker()
    queued = make_snapshot("validating", expires_at=int(NOW) + 7200)
    observe(waiting, queued, NOW)
    assert waiting.unchanged("batch_a", dict(queued.raw), NOW + 60) is not None
    assert waiting.unchanged("batch_a", dict(queued.raw), NOW + 3601) is None  # batch.expiring is due


def test_a_body_only_loaded_from_the_store_is_validated_once_first() -> None:
    tracker = make_tracker()
    snap = make_snapshot("in_progress", request_counts=counts(3))
    observe(tracker, snap, NOW)
    row = tracker.batches["batch_a"]
    tracker.clear()
    tracker.load([TrackedBatch(source=SOURCE, id="batch_a", origin="cli", added_at=0.0, fingerprint=row.fingerprint)])
    assert tracker.unchanged("batch_a", dict(snap.raw), NOW + 1) is None  # its expires_at is not known here


def test_a_list_item_whose_counts_alone_moved_is_recounted_only_once_its_body_was_seen() -> None:
    tracker, recount = make_tracker(), openai_adapter().rebase
    snap = make_snapshot("in_progress", request_counts=counts(3))
    assert not tracker.recounted("batch_a", dict(snap.raw), recount)  # never seen
    observe(tracker, snap, NOW)
    moved = dict(snap.raw) | {"request_counts": counts(4)}
    assert tracker.recounted("batch_a", moved, recount)
    assert not tracker.recounted("batch_a", moved | {"status": "finalizing"}, recount)  # more than its counts
    assert not tracker.recounted("batch_a", moved, lambda _raw, _counts: None)  # counts not in the plain shape
    assert not tracker.recounted("batch_b", moved, recount)  # not tracked
    row = tracker.batches["batch_a"]
    tracker.clear()
    tracker.load([TrackedBatch(source=SOURCE, id="batch_a", origin="cli", added_at=0.0, fingerprint=row.fingerprint)])
    assert not tracker.recounted("batch_a", moved, recount)  # only loaded from the store: checked in full first


def test_a_body_found_changed_is_encoded_and_hashed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = make_tracker()
    snap = make_snapshot("in_progress", request_counts=counts(3))
    observe(tracker, snap, NOW)
    moved = make_snapshot("in_progress", request_counts=counts(4))
    assert tracker.unchanged("batch_a", moved.raw, NOW + 1) is None
    monkeypatch.setattr("poller.polling.tracker.dump_body", lambda _raw: pytest.fail("encoded twice"))
    assert tracker.body(moved) == (dump_body(moved.raw), fingerprint(dump_body(moved.raw)))
    monkeypatch.undo()
    other = make_snapshot("in_progress", request_counts=counts(4))  # an equal body, but another item
    assert tracker.body(other) == tracker.body(moved)
