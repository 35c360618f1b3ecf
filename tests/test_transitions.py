"""Transition detection, driven through tables with a fixed clock (like arq's tests/test_cron.py).

Every expectation below comes from the issue's spec, not from reading `poller/domain/transitions.py`.
Snapshots come from the OpenAI adapter (`tests.helpers.make_snapshot`); the events checked are the ones
the recorder would publish for each change (`build_event`).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from poller.domain.events import Event, build_event
from poller.domain.snapshot import Snapshot
from poller.domain.transitions import (
    Change,
    Detection,
    Knowledge,
    Policy,
    detect,
    progress_phase,
    pruned,
    stalled,
)
from tests.helpers import make_snapshot

SOURCE = "openai"
PROVIDER = "openai"
T0 = 1_700_000_000  # the batch's created_at
NOW = T0 + 5_000  # a detection time later than every *_at used below
POLICY = Policy(progress=True, progress_interval=60.0, stall_after=1800.0, expiry_warning=3600.0)


def counts(completed: int, failed: int = 0, total: int = 100) -> dict[str, int]:
    return {"completed": completed, "failed": failed, "total": total}


def first_sight(snap: Snapshot, now: float = NOW - 1000, policy: Policy = POLICY) -> Knowledge:
    return detect(Knowledge(), snap, now, policy).knowledge


def events_of(snap: Snapshot, detection: Detection, now: float, source: str = SOURCE) -> list[Event]:
    """The events the recorder builds for a detection's changes."""
    return [build_event(source, PROVIDER, snap, change, now) for change in detection.changes]


class Run:
    """Feeds snapshots through detect one after another, as the daemon would."""

    def __init__(self, policy: Policy = POLICY) -> None:
        self.policy = policy
        self.knowledge = Knowledge()
        self.events: list[Event] = []
        self.per_poll: list[list[Event]] = []
        self.warnings: list[str | None] = []

    def poll(self, snap: Snapshot, now: float) -> Detection:
        result = detect(self.knowledge, snap, now, self.policy)
        events = events_of(snap, result, now)
        self.knowledge = result.knowledge
        self.events += events
        self.per_poll.append(events)
        self.warnings.append(result.warning)
        return result


def assert_sequences_consecutive(events: list[Event], start: int = 1) -> None:
    assert [e.data.sequence for e in events] == list(range(start, start + len(events)))


# -- status events ---------------------------------------------------------------------------------

STATUS_CASES = [
    # stored status (None: never seen), fetched status, fetched *_at fields, expected (type, previous, created_at)
    # A change dated NOW is one the provider stamped nothing for: it must say it was dated by detection.
    pytest.param(None, "validating", {}, [("batch.validating", None, T0)], id="first-sight-validating"),
    pytest.param(
        None,
        "completed",
        {"in_progress_at": T0 + 10, "finalizing_at": T0 + 200, "completed_at": T0 + 300},
        [
            ("batch.validating", None, T0),
            ("batch.in_progress", "validating", T0 + 10),
            ("batch.finalizing", "in_progress", T0 + 200),
            ("batch.completed", "finalizing", T0 + 300),
        ],
        id="first-sight-final-reconstructs-its-history",
    ),
    pytest.param(
        None,
        "in_progress",
        {},
        [("batch.validating", None, T0), ("batch.in_progress", "validating", NOW)],
        id="first-sight-no-timestamp-uses-now",
    ),
    pytest.param(
        None,
        "failed",
        {"failed_at": T0 + 5},
        [("batch.validating", None, T0), ("batch.failed", "validating", T0 + 5)],
        id="first-sight-failed",
    ),
    pytest.param(
        None,
        "failed",
        {},
        [("batch.validating", None, T0), ("batch.failed", "validating", NOW)],
        id="first-sight-failed-unstamped",
    ),
    pytest.param(
        None,
        "completed",
        {"completed_at": T0 + 300},
        [
            ("batch.validating", None, T0),
            ("batch.in_progress", "validating", NOW),
            ("batch.completed", "in_progress", T0 + 300),
        ],
        id="first-sight-completed-implies-in_progress",
    ),
    pytest.param(
        None,
        "finalizing",
        {"finalizing_at": T0 + 200},
        [
            ("batch.validating", None, T0),
            ("batch.in_progress", "validating", NOW),
            ("batch.finalizing", "in_progress", T0 + 200),
        ],
        id="first-sight-finalizing-implies-in_progress",
    ),
    pytest.param(
        None,
        "cancelled",
        {"cancelled_at": T0 + 90},
        [("batch.validating", None, T0), ("batch.cancelled", "validating", T0 + 90)],
        id="first-sight-cancelled-implies-nothing-unstamped",
    ),
    pytest.param(
        "validating",
        "in_progress",
        {"in_progress_at": T0 + 10},
        [("batch.in_progress", "validating", T0 + 10)],
        id="validating-to-in_progress",
    ),
    pytest.param(
        "validating",
        "in_progress",
        {},
        [("batch.in_progress", "validating", NOW)],
        id="missing-timestamp-falls-back-to-detection-time",
    ),
    pytest.param(
        "validating",
        "completed",
        {"completed_at": T0 + 300},
        [("batch.in_progress", "validating", NOW), ("batch.completed", "in_progress", T0 + 300)],
        id="completed-implies-in_progress-even-unstamped",
    ),
    pytest.param(
        "validating",
        "completed",
        {"in_progress_at": T0 + 10, "finalizing_at": T0 + 200, "completed_at": T0 + 300},
        [
            ("batch.in_progress", "validating", T0 + 10),
            ("batch.finalizing", "in_progress", T0 + 200),
            ("batch.completed", "finalizing", T0 + 300),
        ],
        id="missed-in_progress-and-finalizing",
    ),
    pytest.param(
        "in_progress",
        "completed",
        {"in_progress_at": T0 + 10, "finalizing_at": T0 + 200, "completed_at": T0 + 300},
        [("batch.finalizing", "in_progress", T0 + 200), ("batch.completed", "finalizing", T0 + 300)],
        id="missed-finalizing",
    ),
    pytest.param(
        "in_progress",
        "cancelled",
        {"in_progress_at": T0 + 10, "cancelling_at": T0 + 50, "cancelled_at": T0 + 90},
        [("batch.cancelling", "in_progress", T0 + 50), ("batch.cancelled", "cancelling", T0 + 90)],
        id="missed-cancelling",
    ),
    pytest.param(
        "validating",
        "cancelled",
        {"in_progress_at": T0 + 10, "cancelling_at": T0 + 50, "cancelled_at": T0 + 90},
        [
            ("batch.in_progress", "validating", T0 + 10),
            ("batch.cancelling", "in_progress", T0 + 50),
            ("batch.cancelled", "cancelling", T0 + 90),
        ],
        id="missed-in_progress-and-cancelling",
    ),
    pytest.param(
        "cancelling",
        "cancelled",
        {"in_progress_at": T0 + 10, "cancelling_at": T0 + 50, "cancelled_at": T0 + 90},
        [("batch.cancelled", "cancelling", T0 + 90)],
        id="cancelling-to-cancelled",
    ),
    pytest.param(
        "validating", "failed", {"failed_at": T0 + 5}, [("batch.failed", "validating", T0 + 5)], id="validation-failed"
    ),
    pytest.param(
        "in_progress",
        "expired",
        {"in_progress_at": T0 + 10, "expired_at": T0 + 86_400},
        [("batch.expired", "in_progress", T0 + 86_400)],
        id="expired",
    ),
    pytest.param(
        "finalizing",
        "completed",
        {"in_progress_at": T0 + 10, "finalizing_at": T0 + 200, "completed_at": T0 + 300},
        [("batch.completed", "finalizing", T0 + 300)],
        id="finalizing-to-completed",
    ),
]


@pytest.mark.parametrize(("stored", "status", "times", "expected"), STATUS_CASES)
def test_status_events(
    stored: str | None, status: str, times: dict[str, Any], expected: list[tuple[str, str | None, int]]
) -> None:
    known = Knowledge() if stored is None else first_sight(make_snapshot(stored, **times))
    fetched = make_snapshot(status, request_counts=counts(3), **times)

    result = detect(known, fetched, NOW, POLICY)
    events = events_of(fetched, result, NOW)

    assert result.warning is None
    assert [(e.type, e.data.previous_status, e.created_at) for e in events] == expected
    assert [c.dated_by_detection for c in result.changes] == [when == NOW for _, _, when in expected]
    for event in events:
        assert event.type == f"batch.{event.data.status}"
        assert event.object == "event"
        assert event.data.id == "batch_a"
        assert event.data.source == SOURCE
        assert event.data.provider == PROVIDER
        assert event.data.provider_status == status
        assert event.data.request_counts == {"total": 100, "completed": 3, "failed": 0}
        assert event.data.detected_at == NOW
        assert event.data.batch == fetched.raw
    assert all(c.is_status for c in result.changes)
    assert_sequences_consecutive(events, start=known.sequence + 1)
    assert result.knowledge.sequence == known.sequence + len(expected)
    assert result.knowledge.status == status
    assert result.knowledge.seen >= {e.data.status for e in events}
    assert result.status_changed


# -- nothing to emit: repeats, stale snapshots, unknown statuses ----------------------------------

TIMES: dict[str, Any] = {"in_progress_at": T0 + 10, "finalizing_at": T0 + 200, "completed_at": T0 + 300}

IGNORED_CASES = [
    # id, snapshots already seen (in order), the snapshot fed now, whether a warning is expected
    pytest.param(["validating"], "validating", False, id="same-validating-twice"),
    pytest.param(["validating", "completed"], "completed", False, id="same-completed-twice"),
    pytest.param(["completed"], "completed", False, id="same-reconstructed-completed-twice"),
    pytest.param(["validating", "in_progress"], "validating", True, id="stale-validating-after-in_progress"),
    pytest.param(["in_progress", "completed"], "in_progress", True, id="stale-in_progress-after-completed"),
    pytest.param(["validating", "completed"], "finalizing", True, id="stale-reconstructed-finalizing"),
    pytest.param(["validating", "completed"], "in_progress", True, id="stale-reconstructed-in_progress"),
    pytest.param(["completed"], "validating", True, id="stale-validating-after-first-sight-completed"),
    pytest.param(["completed"], "failed", True, id="another-final-status-after-final"),
    pytest.param(["in_progress", "cancelling"], "in_progress", True, id="stale-in_progress-after-cancelling"),
    pytest.param(["validating"], "paused", True, id="unknown-status"),
    pytest.param([], "paused", True, id="unknown-status-first-sight"),
    pytest.param(["in_progress", "finalizing"], "reticulating", True, id="unknown-status-mid-life"),
]


@pytest.mark.parametrize(("history", "fetched", "warns"), IGNORED_CASES)
def test_nothing_is_emitted_twice_and_bad_statuses_change_nothing(
    history: list[str], fetched: str, warns: bool
) -> None:
    run = Run()
    for i, status in enumerate(history):
        run.poll(make_snapshot(status, **TIMES), NOW + i)
    before = run.knowledge

    result = detect(before, make_snapshot(fetched, **TIMES), NOW + 100, POLICY)

    assert result.changes == []
    assert (result.warning is not None) == warns
    assert result.knowledge == before
    assert not result.status_changed


def test_an_unknown_status_is_named_in_the_warning() -> None:
    snap = make_snapshot("paused")
    assert snap.status is None
    assert snap.provider_status == "paused"
    result = detect(Knowledge(), snap, NOW, POLICY)
    assert result.warning is not None
    assert "'paused'" in result.warning


def test_each_status_is_emitted_once_over_a_noisy_history() -> None:
    """Replays, stale snapshots and unknown statuses in between: each status still appears exactly once."""
    snapshots = [
        "validating",
        "validating",
        "in_progress",
        "validating",
        "weird",
        "in_progress",
        "finalizing",
        "in_progress",
        "completed",
        "finalizing",
        "completed",
    ]
    run = Run()
    for i, status in enumerate(snapshots):
        run.poll(make_snapshot(status, **TIMES), NOW + i)

    assert [e.type for e in run.events] == [
        "batch.validating",
        "batch.in_progress",
        "batch.finalizing",
        "batch.completed",
    ]
    assert [e.data.previous_status for e in run.events] == [None, "validating", "in_progress", "finalizing"]
    assert_sequences_consecutive(run.events)
    assert [i for i, w in enumerate(run.warnings) if w is not None] == [3, 4, 7, 9]


def test_detection_is_pure() -> None:
    known = first_sight(make_snapshot("validating"))
    fetched = make_snapshot("completed", **TIMES)
    first = detect(known, fetched, NOW, POLICY)
    second = detect(known, fetched, NOW, POLICY)
    assert first == second
    assert known == first_sight(make_snapshot("validating"))


# -- event ids ---------------------------------------------------------------------------------------


def test_redetection_after_a_crash_gives_the_same_ids() -> None:
    """The store lost the last commit: the same knowledge meets the same batch later; ids must match."""
    known = first_sight(make_snapshot("validating"))
    fetched = make_snapshot("completed", **TIMES)
    before_crash = events_of(fetched, detect(known, fetched, NOW, POLICY), NOW)
    after_restart = events_of(fetched, detect(known, fetched, NOW + 3600.5, POLICY), NOW + 3600.5)

    assert [e.id for e in before_crash] == [e.id for e in after_restart]
    assert len({e.id for e in before_crash}) == 3  # distinct per type


@pytest.mark.parametrize(
    ("source", "batch_id", "status"),
    [
        pytest.param("azure", "batch_a", "validating", id="other-source"),
        pytest.param(SOURCE, "batch_other", "validating", id="other-batch"),
        pytest.param(SOURCE, "batch_a", "in_progress", id="other-type"),
    ],
)
def test_ids_differ_when_source_batch_or_type_differ(source: str, batch_id: str, status: str) -> None:
    ref_snap = make_snapshot("validating")
    [reference] = events_of(ref_snap, detect(Knowledge(), ref_snap, NOW, POLICY), NOW)
    snap = make_snapshot(status, batch_id=batch_id)
    # the last change of a first sight is the status the batch is in (the rest is reconstructed history)
    other = events_of(snap, detect(Knowledge(), snap, NOW, POLICY), NOW, source=source)[-1]
    assert other.type == f"batch.{status}"
    assert other.id != reference.id


def test_first_sight_id_does_not_depend_on_time_or_sequence() -> None:
    snap = make_snapshot("in_progress")
    a = events_of(snap, detect(Knowledge(), snap, NOW, POLICY), NOW)
    b = events_of(snap, detect(Knowledge(sequence=41), snap, NOW + 999, POLICY), NOW + 999)
    assert [e.type for e in a] == ["batch.validating", "batch.in_progress"]
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.data.sequence for e in b] == [42, 43]


def test_progress_ids_include_the_counts() -> None:
    def progress_after(completed: int) -> Event:
        run = Run()
        run.poll(make_snapshot("in_progress", request_counts=counts(0)), NOW)
        run.poll(make_snapshot("in_progress", request_counts=counts(completed)), NOW + 100)
        [event] = run.per_poll[-1]
        assert event.type == "batch.progress"
        return event

    assert progress_after(10).id == progress_after(10).id
    assert progress_after(10).id != progress_after(20).id


# -- progress ----------------------------------------------------------------------------------------

C0, C1, C2, C3 = counts(0), counts(10), counts(20, 1), counts(30, 2)
#: A batch whose phase is nearly the whole interval: it may report progress on the first change after
#: it is first seen, so the cases below test the throttle alone.
EARLY = next(b for b in (f"batch_{n}" for n in itertools.count()) if progress_phase(b, 60.0) > 59.5)

PROGRESS_CASES = [
    # id, policy, polls as (seconds after NOW, status, request_counts), expected progress as (poll index, counts)
    pytest.param(POLICY, [(0, "in_progress", C0), (30, "in_progress", C1)], [(1, C1)], id="change-emits"),
    pytest.param(
        POLICY, [(0, "in_progress", C0), (30, "in_progress", C0), (500, "in_progress", C0)], [], id="no-change-no-event"
    ),
    pytest.param(
        POLICY,
        [(0, "in_progress", C0), (30, "in_progress", C1), (60, "in_progress", C2), (95, "in_progress", C2)],
        [(1, C1), (3, C2)],
        id="suppressed-change-emitted-once-interval-passed",
    ),
    pytest.param(
        POLICY,
        [(0, "in_progress", C0), (30, "in_progress", C1), (50, "in_progress", C2), (89, "in_progress", C3)],
        [(1, C1)],
        id="at-most-one-per-interval",
    ),
    pytest.param(
        POLICY,
        [(0, "in_progress", C0), (30, "in_progress", C1), (50, "in_progress", C2), (90, "in_progress", C3)],
        [(1, C1), (3, C3)],
        id="latest-counts-after-interval",
    ),
    pytest.param(
        POLICY,
        [(0, "in_progress", C0), (30, "in_progress", C1), (50, "in_progress", C2), (70, "in_progress", C1)],
        [(1, C1)],
        id="back-to-last-emitted-counts-nothing-to-report",
    ),
    pytest.param(
        Policy(progress=False),
        [(0, "in_progress", C0), (30, "in_progress", C1), (200, "in_progress", C2)],
        [],
        id="disabled",
    ),
    pytest.param(
        POLICY,
        [(0, "validating", C0), (100, "in_progress", C1)],
        [],
        id="none-in-the-status-change-poll",
    ),
    pytest.param(
        POLICY,
        [(0, "in_progress", C0), (100, "completed", C1), (300, "completed", C2)],
        [],
        id="none-for-final-statuses",
    ),
    pytest.param(
        POLICY,
        [(0, "finalizing", C1), (100, "finalizing", C2)],
        [(1, C2)],
        id="finalizing-is-not-final",
    ),
]


@pytest.mark.parametrize(("policy", "polls", "expected"), PROGRESS_CASES)
def test_progress(
    policy: Policy, polls: list[tuple[float, str, dict[str, int]]], expected: list[tuple[int, dict[str, int]]]
) -> None:
    run = Run(policy=policy)
    for offset, status, rc in polls:
        run.poll(make_snapshot(status, EARLY, request_counts=rc), NOW + offset)

    emitted = [
        (i, event.data.batch["request_counts"])
        for i, events in enumerate(run.per_poll)
        for event in events
        if event.type == "batch.progress"
    ]
    assert emitted == expected
    for i, events in enumerate(run.per_poll):
        progress = [e for e in events if e.type == "batch.progress"]
        assert len(progress) <= 1
        assert not (progress and any(e.type.removeprefix("batch.") == e.data.status for e in events))
        for event in progress:
            assert event.data.request_counts == {k: polls[i][2][k] for k in ("total", "completed", "failed")}
    assert_sequences_consecutive(run.events)


def test_batches_first_seen_together_spread_their_first_progress_over_the_interval() -> None:
    batches, step = 1_000, 3  # seen at NOW, then polled every 3 s with counts moving, for one interval
    first: list[int] = []
    for n in range(batches):
        run, batch = Run(policy=POLICY), f"batch_{n:06d}"
        run.poll(make_snapshot("in_progress", batch, request_counts=C0), NOW)
        for second in range(step, 61, step):
            if run.poll(make_snapshot("in_progress", batch, request_counts=counts(second)), NOW + second).changes:
                first.append(second)
                break
    assert len(first) == batches  # every one reports within one interval of first sight
    per_tenth = [sum(1 for s in first if tenth * 6 < s <= (tenth + 1) * 6) for tenth in range(10)]
    assert all(batches * 0.06 <= n <= batches * 0.14 for n in per_tenth), per_tenth


def test_a_batch_progress_phase_is_fixed_by_its_id() -> None:
    assert progress_phase("batch_a", 60.0) == progress_phase("batch_a", 60.0)
    assert 0.0 <= progress_phase("batch_a", 60.0) < 60.0
    assert progress_phase("batch_a", 120.0) == 2 * progress_phase("batch_a", 60.0)
    assert len({progress_phase(f"batch_{n}", 60.0) for n in range(100)}) == 100


# -- stalls ------------------------------------------------------------------------------------------

QUIET = Policy(progress=False, stall_after=1800.0, expiry_warning=3600.0)

STALL_CASES = [
    # id, polls as (seconds after NOW, status, completed count), polls that must emit batch.stalled
    pytest.param([(0, "in_progress", 5), (1000, "in_progress", 5), (1799, "in_progress", 5)], [], id="not-yet"),
    pytest.param(
        [(0, "in_progress", 5), (1000, "in_progress", 5), (1800, "in_progress", 5), (2500, "in_progress", 5)],
        [2],
        id="once-per-stall",
    ),
    pytest.param(
        [(0, "in_progress", 5), (1000, "in_progress", 6), (2000, "in_progress", 6), (2800, "in_progress", 6)],
        [3],
        id="clock-restarts-when-counts-move",
    ),
    pytest.param(
        [
            (0, "in_progress", 5),
            (1800, "in_progress", 5),
            (2000, "in_progress", 6),
            (3700, "in_progress", 6),
            (3800, "in_progress", 6),
            (9000, "in_progress", 6),
        ],
        [1, 4],
        id="new-stall-after-counts-moved",
    ),
    pytest.param([(0, "validating", 0), (5000, "validating", 0)], [], id="not-while-validating"),
    pytest.param([(0, "finalizing", 5), (5000, "finalizing", 5)], [], id="not-while-finalizing"),
    pytest.param([(0, "completed", 5), (5000, "completed", 5)], [], id="not-when-final"),
]


@pytest.mark.parametrize(("polls", "expected"), STALL_CASES)
def test_stalled(polls: list[tuple[float, str, int]], expected: list[int]) -> None:
    run = Run(policy=QUIET)
    for offset, status, done in polls:
        run.poll(make_snapshot(status, request_counts=counts(done)), NOW + offset)

    stalled_polls = [i for i, events in enumerate(run.per_poll) for e in events if e.type == "batch.stalled"]
    assert stalled_polls == expected
    stalls = [e for e in run.events if e.type == "batch.stalled"]
    assert len({e.id for e in stalls}) == len(stalls)  # a new stall is a new event
    assert_sequences_consecutive(run.events)


STALLED_NOW_CASES = [
    # id, polls as (seconds after NOW, status, completed count), whether the batch counts as stalled after each
    pytest.param([(0, "in_progress", 5), (1000, "in_progress", 5)], [False, False], id="not-yet"),
    pytest.param(
        [(0, "in_progress", 5), (1800, "in_progress", 5), (2500, "in_progress", 5)],
        [False, True, True],
        id="from-its-stall-event-on",
    ),
    pytest.param(
        [(0, "in_progress", 5), (1800, "in_progress", 5), (1900, "in_progress", 6)],
        [False, True, False],
        id="cleared-when-counts-move",
    ),
    pytest.param(
        [(0, "in_progress", 5), (1800, "in_progress", 5), (1900, "finalizing", 5)],
        [False, True, False],
        id="cleared-when-status-moves",
    ),
    pytest.param(
        [(0, "in_progress", 5), (1800, "in_progress", 5), (1900, "in_progress", 6), (3700, "in_progress", 6)],
        [False, True, False, True],
        id="stalled-again-at-new-counts",
    ),
]


@pytest.mark.parametrize(("polls", "expected"), STALLED_NOW_CASES)
def test_stalled_now(polls: list[tuple[float, str, int]], expected: list[bool]) -> None:
    """What `batch_poller_stalled_batches` counts: a batch from its `batch.stalled` until it moves."""
    run = Run(policy=QUIET)
    seen = []
    for offset, status, done in polls:
        run.poll(make_snapshot(status, request_counts=counts(done)), NOW + offset)
        seen.append(stalled(run.knowledge))
    assert seen == expected


# -- expiry ------------------------------------------------------------------------------------------

EXPIRES = NOW + 86_400
EDGE = EXPIRES - 3600 - NOW  # the first offset inside the warning window

EXPIRY_CASES = [
    # id, polls as (seconds after NOW, status), polls that must emit batch.expiring
    pytest.param([(0, "validating"), (EDGE - 1, "validating")], [], id="too-early"),
    pytest.param(
        [(0, "validating"), (EDGE - 1, "validating"), (EDGE, "validating"), (EDGE + 60, "validating")],
        [2],
        id="validating-once",
    ),
    pytest.param(
        [(0, "in_progress"), (EDGE + 10, "in_progress"), (EDGE + 20, "in_progress"), (EDGE + 4000, "in_progress")],
        [1],
        id="in_progress-once-even-past-expiry",
    ),
    pytest.param(
        [(0, "validating"), (EDGE, "validating"), (EDGE + 30, "in_progress"), (EDGE + 60, "in_progress")],
        [1],
        id="not-again-after-status-change",
    ),
    pytest.param([(0, "finalizing"), (EDGE, "finalizing"), (EDGE + 60, "finalizing")], [], id="never-finalizing"),
    pytest.param([(0, "completed"), (EDGE, "completed")], [], id="never-final"),
    pytest.param([(0, "cancelling"), (EDGE, "cancelling")], [], id="never-cancelling"),
    pytest.param(
        [(0, "in_progress"), (EDGE - 10, "in_progress"), (EDGE, "finalizing"), (EDGE + 60, "finalizing")],
        [],
        id="left-the-watched-statuses-before-the-window",
    ),
]


@pytest.mark.parametrize(("polls", "expected"), EXPIRY_CASES)
def test_expiring(polls: list[tuple[float, str]], expected: list[int]) -> None:
    run = Run(policy=QUIET)
    for offset, status in polls:
        run.poll(make_snapshot(status, expires_at=EXPIRES, request_counts=counts(1)), NOW + offset)

    expiring_polls = [i for i, events in enumerate(run.per_poll) for e in events if e.type == "batch.expiring"]
    assert expiring_polls == expected
    for i in expected:
        [event] = [e for e in run.per_poll[i] if e.type == "batch.expiring"]
        assert event.data.status in {"validating", "in_progress"}
    assert_sequences_consecutive(run.events)


def test_sequence_is_strict_over_a_whole_lifecycle() -> None:
    """Status, progress, stall and expiry events of one batch share one strictly increasing sequence."""
    expires = NOW + 86_400
    polls: list[tuple[float, dict[str, Any]]] = [
        (0, {"status": "validating", "request_counts": counts(0, total=0)}),
        (60, {"status": "in_progress", "request_counts": counts(0), "in_progress_at": T0 + 5_030}),
        (200, {"status": "in_progress", "request_counts": counts(10), "in_progress_at": T0 + 5_030}),
        (2100, {"status": "in_progress", "request_counts": counts(10), "in_progress_at": T0 + 5_030}),
        (84_000, {"status": "in_progress", "request_counts": counts(90), "in_progress_at": T0 + 5_030}),
        (
            84_100,
            {
                "status": "completed",
                "request_counts": counts(100),
                "in_progress_at": T0 + 5_030,
                "finalizing_at": T0 + 89_050,
                "completed_at": T0 + 89_090,
            },
        ),
    ]
    run = Run()
    for offset, fields in polls:
        status = fields.pop("status")
        run.poll(make_snapshot(status, batch_id="batch_life", expires_at=expires, **fields), NOW + offset)

    assert [sorted(e.type for e in events) for events in run.per_poll] == [
        ["batch.validating"],
        ["batch.in_progress"],
        ["batch.progress"],
        ["batch.stalled"],
        ["batch.expiring", "batch.progress"],
        ["batch.completed", "batch.finalizing"],
    ]
    assert [e.type for e in run.per_poll[-1]] == ["batch.finalizing", "batch.completed"]
    assert_sequences_consecutive(run.events)
    assert run.knowledge.sequence == len(run.events)
    assert len({e.id for e in run.events}) == len(run.events)


def test_first_sight_of_a_retracked_batch_does_not_announce_a_known_status_again() -> None:
    fields: dict[str, Any] = {"created_at": T0, "in_progress_at": T0 + 10}
    snap = make_snapshot("in_progress", "batch_r", **fields)
    known = Knowledge(sequence=2, seen=frozenset({"validating", "in_progress"}))
    detection = detect(known, snap, T0 + 1000.0, Policy())
    assert detection.changes == []
    assert detection.knowledge.status == "in_progress"
    assert detection.knowledge.sequence == 2
    later = make_snapshot("completed", "batch_r", **fields, finalizing_at=T0 + 500, completed_at=T0 + 600)
    changes = detect(detection.knowledge, later, T0 + 1001.0, Policy()).changes
    assert [(c.type, c.sequence) for c in changes] == [("batch.finalizing", 3), ("batch.completed", 4)]


# -- the prune notice --------------------------------------------------------------------------------


def test_a_prune_notice_takes_the_next_sequence_and_names_it() -> None:
    run = Run()
    run.poll(make_snapshot("completed", **TIMES), NOW)
    known, change = pruned(run.knowledge, NOW + 60.7)
    assert run.knowledge.sequence == 4  # validating, in_progress, finalizing, completed
    assert change == Change("batch.pruned", "completed", "completed", 5, NOW + 60, discriminator="5")
    assert not change.is_status
    assert known.sequence == run.knowledge.sequence + 1
    again, second = pruned(known, NOW + 120)
    assert second.discriminator != change.discriminator  # a re-tracked batch pruned again gets a new notice
    assert again.sequence == known.sequence + 1


def test_a_prune_notice_of_a_batch_never_seen() -> None:
    known, change = pruned(Knowledge(), NOW)
    assert (change.status, change.previous_status, change.sequence) == ("validating", None, 1)
    assert known.sequence == 1
