"""The tracked set of one source in memory: who is due, what a fetched snapshot or an error means for
a batch, and whether a refresh is cheaper through list pages or one retrieve per batch.

Pure: no I/O; the caller passes `now` and the random source. What it returns (rows to write and the
changes detected) goes to the recorder.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from poller.domain.lifecycle import is_final
from poller.domain.schedule import Intervals, Rand, error_delay
from poller.domain.snapshot import Snapshot
from poller.domain.transitions import Change, Policy, detect
from poller.errors import ApiError
from poller.store.base import ACTIVE, FINAL, GONE, TrackedBatch


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 5.0
    cap: float = 600.0
    gone_after: int = 3


@dataclass(frozen=True, slots=True)
class Observation:
    """What one snapshot meant for a tracked batch.

    `row` is a copy of the batch to write (None when nothing needs writing), `body` its new body text
    (None when unchanged), `expected_sequence` the stored sequence the write must find (compare-and-set).
    """

    snapshot: Snapshot
    row: TrackedBatch | None
    changes: list[Change] = field(default_factory=list)
    body: str | None = None
    expected_sequence: int = 0
    warning: str | None = None


class Tracker:
    """Tracked batches of one source, their schedules and detection state."""

    def __init__(
        self, source: str, *, intervals: Intervals, policy: Policy, backoff: Backoff, rand: Rand, page_size: int = 100
    ) -> None:
        self.source = source
        self.intervals = intervals
        self.policy = policy
        self.backoff = backoff
        self.rand = rand
        self.page_size = page_size
        self.batches: dict[str, TrackedBatch] = {}
        #: created_at of the oldest item of each page of the most recent list walk, newest first.
        self.page_marks: list[int] = []
        #: How many list items there were per tracked batch on the last walk (untracked batches dilute pages).
        self.density = 1.0

    # -- membership --------------------------------------------------------------------------------

    def load(self, rows: Iterable[TrackedBatch]) -> None:
        """Replace the in-memory set with the store's rows, keeping schedules of batches already known."""
        fresh: dict[str, TrackedBatch] = {}
        for row in rows:
            if row.source != self.source:
                continue
            known = self.batches.get(row.id)
            fresh[row.id] = known if known is not None and known.state == row.state else row
        self.batches = fresh

    def add(self, row: TrackedBatch) -> None:
        row.raw = None  # the poll loop keeps only the fingerprint
        self.batches[row.id] = row

    def forget(self, batch_id: str) -> None:
        self.batches.pop(batch_id, None)

    def active(self) -> list[TrackedBatch]:
        return [b for b in self.batches.values() if b.state == ACTIVE]

    def due(self, now: float) -> list[TrackedBatch]:
        """Active batches whose next poll time has come, most overdue first."""
        due = [b for b in self.batches.values() if b.state == ACTIVE and b.next_due <= now]
        due.sort(key=lambda b: b.next_due)
        return due

    def next_due(self) -> float:
        return min((b.next_due for b in self.batches.values() if b.state == ACTIVE), default=math.inf)

    def defer_all(self, until: float) -> None:
        """Push every active batch's next poll out (a pause such as rejected credentials)."""
        for batch in self.active():
            batch.next_due = max(batch.next_due, until)

    def hurry(self, now: float) -> None:
        """Poll every active batch at once (after a config change that may have fixed something)."""
        for batch in self.active():
            batch.next_due = min(batch.next_due, now)

    # -- outcomes ----------------------------------------------------------------------------------

    def observe(self, snap: Snapshot, body: str, now: float) -> Observation | None:
        """Apply a fetched snapshot; None if the batch is not tracked (or no longer active)."""
        tracked = self.batches.get(snap.id)
        if tracked is None or tracked.state != ACTIVE:
            return None
        expected = tracked.knowledge.sequence
        detection = detect(tracked.knowledge, snap, now, self.policy)
        fingerprint = hash(body)
        changed = fingerprint != tracked.fingerprint
        status = detection.knowledge.status or snap.status or "validating"
        was_erroring = tracked.error_streak > 0 or tracked.not_found > 0
        tracked.error_streak = tracked.not_found = 0
        tracked.interval = self.intervals.next(status, tracked.interval, changed=changed)
        tracked.next_due = now + tracked.interval
        if detection.warning:
            return Observation(snap, None, warning=detection.warning)
        tracked.knowledge = detection.knowledge
        tracked.fingerprint = fingerprint
        tracked.created_at = snap.created_at
        if changed or detection.changes:
            tracked.updated_at = now
        if is_final(status):
            tracked.state, tracked.finished_at, tracked.next_due = FINAL, now, math.inf
        if not (changed or detection.changes or was_erroring):
            return Observation(snap, None)
        return Observation(
            snap, replace(tracked), detection.changes, body if changed else None, expected_sequence=expected
        )

    def failed(self, batch_id: str, error: ApiError, now: float, *, counts_as_gone: bool) -> TrackedBatch | None:
        """Apply a failed retrieve; returns a copy of the row to write when the batch is now marked gone.

        A 404 counts toward `gone` only when `counts_as_gone` (the API's own answer while the API
        otherwise works); any other failure backs the batch off.
        """
        tracked = self.batches.get(batch_id)
        if tracked is None or tracked.state != ACTIVE:
            return None
        if error.status == 404 and counts_as_gone:
            tracked.not_found += 1
            if tracked.not_found >= self.backoff.gone_after:
                tracked.state, tracked.finished_at, tracked.next_due = GONE, now, math.inf
                return replace(tracked)
        else:
            tracked.error_streak += 1
        streak = max(tracked.error_streak, tracked.not_found)
        tracked.next_due = now + error_delay(streak, self.backoff.base, self.backoff.cap, self.rand, error.retry_after)
        return None

    # -- bulk refresh planning ---------------------------------------------------------------------

    def pages_needed(self, oldest_created_at: int) -> int:
        """Estimated list pages to walk, newest first, until `oldest_created_at` is passed."""
        if self.page_marks and oldest_created_at >= self.page_marks[-1]:
            # marks are descending; count pages whose last item is still newer than the target, plus one
            descending = [-m for m in self.page_marks]
            return bisect.bisect_left(descending, -oldest_created_at) + 1
        newer = sum(1 for b in self.batches.values() if b.created_at is not None and b.created_at >= oldest_created_at)
        return max(1, math.ceil(newer * self.density / self.page_size))

    def plan_walk(self, due: Sequence[TrackedBatch]) -> tuple[int | None, int] | None:
        """How to refresh `due` through list pages: (stop_before, max_pages), or None to retrieve each.

        A walk stops early once every due batch was seen, and what it missed is retrieved after it, so
        a plan is chosen only when it costs fewer requests than one retrieve per batch.
        """
        count = len(due)
        if count < 2:
            return None
        placed = [b.created_at for b in due if b.created_at is not None]
        if len(placed) == count:
            oldest = min(placed)
            return (oldest, count - 1) if self.pages_needed(oldest) < count else None
        # Batches never seen yet have no known place in the list, but newly tracked batches are mostly
        # recent: walk as many pages as they would fill, and only when even a fruitless walk followed
        # by every retrieve would cost at most 1.5 times the retrieves alone.
        budget = math.ceil(count * self.density / self.page_size) + 1
        if placed:
            budget = max(budget, self.pages_needed(min(placed)))
        return (None, budget) if 2 * budget <= count else None

    def learn_walk(self, marks: list[int], items: int, tracked_seen: int) -> None:
        """Remember the shape of the last walk, so the next plan estimates pages better."""
        if marks:
            self.page_marks = marks
        if tracked_seen:
            self.density = max(1.0, items / tracked_seen)
