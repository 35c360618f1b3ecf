"""The in-memory tracker: scheduling after a poll or an error, gone batches, and list-vs-retrieve planning."""

from __future__ import annotations

import math
import random

import pytest

from poller.errors import ApiError
from poller.events import decode
from poller.records import ACTIVE, FINAL, GONE, TrackedBatch
from poller.schedule import Intervals
from poller.tracker import Backoff, Tracker
from poller.transitions import Policy
from tests.helpers import make_batch

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


def routed(event_type: str, metadata: dict[str, str] | None) -> list[str]:
    sinks = ["stdout"]
    if (metadata or {}).get("team") == "ml":
        sinks.append("mqtt")
    return sinks


def make_tracker(rand: random.Random | None = None, ids: tuple[str, ...] = ("batch_a",)) -> Tracker:
    tracker = Tracker(
        SOURCE,
        intervals=Intervals(base=BASE, growth=2.0, max_interval=300.0),
        policy=Policy(),
        backoff=Backoff(base=5.0, cap=600.0, gone_after=3),
        router=routed,
        rand=(rand or random.Random(SEED)).random,
    )
    tracker.load(TrackedBatch(source=SOURCE, id=i, origin="cli", added_at=0.0) for i in ids)
    return tracker


# -- observe -----------------------------------------------------------------------------------------


def test_first_observation_records_the_event_and_schedules_at_the_status_base() -> None:
    tracker = make_tracker()
    observation = tracker.observe(make_batch("validating", metadata={"team": "ml"}), NOW)

    assert observation is not None
    assert observation.update is not None
    row, events = observation.update
    assert row.id == "batch_a"
    assert row.state == ACTIVE
    assert row.next_due == NOW + BASE["validating"]
    assert row.created_at == T0
    assert row.knowledge.status == "validating"
    assert [e.type for e in events] == ["batch.validating"]
    assert list(events[0].sinks) == ["stdout", "mqtt"]
    assert decode(events[0].payload) == observation.events[0]
    assert events[0].id == observation.events[0].id
    assert events[0].sequence == 1
    assert tracker.due(NOW + 9.9) == []
    assert [b.id for b in tracker.due(NOW + 10.0)] == ["batch_a"]


def test_unchanged_batch_gives_no_update_and_backs_off() -> None:
    tracker = make_tracker()
    batch = make_batch("in_progress", request_counts={"completed": 1, "failed": 0, "total": 9})
    tracker.observe(batch, NOW)

    intervals = []
    now = NOW
    for _ in range(6):
        now = tracker.batches["batch_a"].next_due
        observation = tracker.observe(batch, now)
        assert observation is not None
        assert observation.update is None
        assert observation.events == []
        intervals.append(tracker.batches["batch_a"].next_due - now)
    assert intervals == [60.0, 120.0, 240.0, 300.0, 300.0, 300.0]  # base 30, x2 per quiet poll, cap 300


def test_a_change_resets_the_interval_to_the_new_status_base() -> None:
    tracker = make_tracker()
    tracker.observe(make_batch("validating"), NOW)
    tracker.observe(make_batch("validating"), NOW + 10)
    tracker.observe(make_batch("validating"), NOW + 30)
    assert tracker.batches["batch_a"].interval == 40.0

    observation = tracker.observe(make_batch("in_progress", in_progress_at=T0 + 1_050), NOW + 70)
    assert observation is not None
    assert observation.update is not None
    assert [e.type for e in observation.update[1]] == ["batch.in_progress"]
    assert tracker.batches["batch_a"].next_due == NOW + 70 + BASE["in_progress"]


def test_final_batch_is_marked_final_and_never_due_again() -> None:
    tracker = make_tracker()
    tracker.observe(make_batch("in_progress"), NOW)
    done = make_batch("completed", finalizing_at=T0 + 1_010, completed_at=T0 + 1_020)
    observation = tracker.observe(done, NOW + 30)

    assert observation is not None
    assert observation.update is not None
    row, events = observation.update
    assert row.state == FINAL
    assert row.finished_at == NOW + 30
    assert [e.type for e in events] == ["batch.finalizing", "batch.completed"]
    assert math.isinf(tracker.batches["batch_a"].next_due)
    assert tracker.due(NOW + 10**9) == []
    assert tracker.active() == []
    assert tracker.observe(done, NOW + 60) is None


def test_update_is_a_copy_not_the_live_record() -> None:
    tracker = make_tracker()
    observation = tracker.observe(make_batch("validating"), NOW)
    assert observation is not None
    assert observation.update is not None
    row = observation.update[0]
    tracker.observe(make_batch("in_progress"), NOW + 10)
    assert row.knowledge.status == "validating"


def test_untracked_batch_is_ignored() -> None:
    tracker = make_tracker()
    assert tracker.observe(make_batch("validating", batch_id="batch_unknown"), NOW) is None


def test_stale_snapshot_warns_and_writes_nothing() -> None:
    tracker = make_tracker()
    tracker.observe(make_batch("in_progress"), NOW)
    observation = tracker.observe(make_batch("validating"), NOW + 30)
    assert observation is not None
    assert observation.update is None
    assert observation.events == []
    assert observation.warning
    assert tracker.batches["batch_a"].knowledge.status == "in_progress"


# -- failed ------------------------------------------------------------------------------------------


def test_not_found_gone_after_times_marks_the_batch_gone() -> None:
    tracker = make_tracker()
    tracker.observe(make_batch("in_progress"), NOW)
    missing = ApiError("no such batch", status=404)

    assert tracker.failed("batch_a", missing, NOW + 30) is None
    assert tracker.failed("batch_a", missing, NOW + 60) is None
    assert tracker.batches["batch_a"].state == ACTIVE
    update = tracker.failed("batch_a", missing, NOW + 90)

    assert update is not None
    row, events = update
    assert row.state == GONE
    assert row.finished_at == NOW + 90
    assert events == []
    assert tracker.due(NOW + 10**9) == []
    assert tracker.failed("batch_a", missing, NOW + 120) is None


def test_a_successful_poll_resets_the_not_found_count() -> None:
    tracker = make_tracker()
    missing = ApiError("no such batch", status=404)
    tracker.failed("batch_a", missing, NOW)
    tracker.failed("batch_a", missing, NOW + 1)
    tracker.observe(make_batch("in_progress"), NOW + 2)
    tracker.failed("batch_a", missing, NOW + 3)
    tracker.failed("batch_a", missing, NOW + 4)
    assert tracker.batches["batch_a"].state == ACTIVE


@pytest.mark.parametrize("status", [500, 503, None, 400, 401])
def test_other_errors_back_off_with_full_jitter(status: int | None) -> None:
    tracker = make_tracker()
    reference = random.Random(SEED)
    error = ApiError("boom", status=status)
    now = NOW
    for streak in range(1, 9):
        assert tracker.failed("batch_a", error, now) is None
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
    tracker.failed("batch_a", ApiError("slow down", status=429, retry_after=retry_after), NOW)
    assert tracker.batches["batch_a"].next_due == pytest.approx(NOW + expected_delay)


def test_not_before_is_honoured() -> None:
    tracker = make_tracker(rand=Fixed(0.5))
    tracker.failed("batch_a", ApiError("down", status=502), NOW, not_before=NOW + 999)
    assert tracker.batches["batch_a"].next_due == NOW + 999


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

    def unplaced(n):
        return [TrackedBatch(source=SOURCE, id=f"x{i}", origin="cli", added_at=0.0) for i in range(n)]

    # 50 never-seen batches fit on one page: walk up to 2 pages, with no created_at to stop at.
    assert tracker.plan_walk(unplaced(50)) == (None, 2)
    # 3 never-seen batches: even one page plus the retrieves after a miss costs more than 3 retrieves.
    assert tracker.plan_walk(unplaced(3)) is None
    # Mixed with a placed batch deep in the list, the budget covers reaching it.
    deep = tracker.batches["b0"]
    stop_before, pages = tracker.plan_walk([*unplaced(50), deep])
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
    tracker.learn_walk([T0 + 900, T0 + 800, T0 + 700], items=300, tracked_seen=300)
    assert tracker.pages_needed(oldest) == pages


@pytest.mark.parametrize(("count", "expected"), [(9, False), (10, False), (11, True)])
def test_list_only_when_strictly_fewer_requests(count: int, expected: bool) -> None:
    """Reaching the oldest of 1000 takes 10 pages: worth it only for more than 10 due batches."""
    tracker = tracker_with_created([T0 + i for i in range(1000)])
    due = [tracker.batches[f"b{i}"] for i in range(count)]
    assert tracker.pages_needed(T0) == 10
    assert (tracker.plan_walk(due) is not None) is expected
