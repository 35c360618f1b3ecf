"""The tracked set in memory: who is due, what a fetched batch or an error means for it, and whether a
refresh is cheaper through list pages or one retrieve per batch.

Pure: no I/O; the caller passes `now` and the random source. Its outputs are store updates (the batch row
and the new events, already routed to sinks) that the daemon writes in one transaction.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from poller.errors import ApiError
from poller.events import encode
from poller.models import LIST_PAGE_SIZE, Batch, Event
from poller.records import ACTIVE, FINAL, GONE, NewEvent, TrackedBatch
from poller.schedule import Intervals, Rand, error_delay
from poller.transitions import Policy, detect, is_final

Router = Callable[[str, dict[str, str] | None], list[str]]
Update = tuple[TrackedBatch, list[NewEvent]]


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 5.0
    cap: float = 600.0
    gone_after: int = 3


@dataclass(frozen=True, slots=True)
class Observation:
    """What one fetched batch meant: the store update (if anything must be written), events, warning."""

    update: Update | None
    events: list[Event]
    warning: str | None = None


class Tracker:
    """Tracked batches of one source, their schedules and detection state."""

    def __init__(
        self,
        source: str,
        *,
        intervals: Intervals,
        policy: Policy,
        backoff: Backoff,
        router: Router,
        rand: Rand,
    ) -> None:
        self.source = source
        self.intervals = intervals
        self.policy = policy
        self.backoff = backoff
        self.router = router
        self.rand = rand
        self.batches: dict[str, TrackedBatch] = {}
        #: created_at of the last item of each page of the most recent list walk, newest first.
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

    def active(self) -> list[TrackedBatch]:
        return [b for b in self.batches.values() if b.state == ACTIVE]

    def due(self, now: float) -> list[TrackedBatch]:
        """Active batches whose next poll time has come, most overdue first."""
        due = [b for b in self.batches.values() if b.state == ACTIVE and b.next_due <= now]
        due.sort(key=lambda b: b.next_due)
        return due

    def next_due(self) -> float:
        return min((b.next_due for b in self.batches.values() if b.state == ACTIVE), default=math.inf)

    # -- outcomes ----------------------------------------------------------------------------------

    def observe(self, batch: Batch, now: float) -> Observation | None:
        """Apply a fetched batch; None if it is not tracked (or no longer active)."""
        tracked = self.batches.get(batch.id)
        if tracked is None or tracked.state != ACTIVE:
            return None
        detection = detect(self.source, tracked.knowledge, batch, now, self.policy)
        snapshot = batch.wire()
        changed = snapshot != tracked.snapshot
        status = detection.knowledge.status or batch.status
        was_erroring = tracked.error_streak > 0 or tracked.not_found > 0
        tracked.error_streak = tracked.not_found = 0
        tracked.interval = self.intervals.next(status, tracked.interval, changed=changed)
        tracked.next_due = now + tracked.interval
        if detection.warning:
            return Observation(None, [], detection.warning)
        tracked.knowledge = detection.knowledge
        tracked.snapshot = snapshot
        tracked.created_at = batch.created_at
        if changed or detection.events:
            tracked.updated_at = now
        if is_final(status):
            tracked.state, tracked.finished_at, tracked.next_due = FINAL, now, math.inf
        if not (changed or detection.events or was_erroring):
            return Observation(None, [])
        events = [
            NewEvent(
                id=e.id,
                type=e.type,
                sequence=e.data.sequence,
                created_at=e.created_at,
                detected_at=e.data.detected_at,
                payload=encode(e),
                sinks=self.router(e.type, batch.metadata),
            )
            for e in detection.events
        ]
        return Observation((replace(tracked), events), detection.events)

    def failed(self, batch_id: str, error: ApiError, now: float, *, not_before: float = 0.0) -> Update | None:
        """Apply a failed retrieve; returns a store update when the batch is now marked gone."""
        tracked = self.batches.get(batch_id)
        if tracked is None or tracked.state != ACTIVE:
            return None
        if error.status == 404:
            tracked.not_found += 1
            if tracked.not_found >= self.backoff.gone_after:
                tracked.state, tracked.finished_at, tracked.next_due = GONE, now, math.inf
                return (replace(tracked), [])
        else:
            tracked.error_streak += 1
        streak = max(tracked.error_streak, tracked.not_found)
        delay = error_delay(streak, self.backoff.base, self.backoff.cap, self.rand, error.retry_after)
        tracked.next_due = max(now + delay, not_before)
        return None

    def defer(self, batch_id: str, until: float) -> None:
        """Push a batch's next poll out (a global pause such as rejected credentials)."""
        tracked = self.batches.get(batch_id)
        if tracked is not None:
            tracked.next_due = max(tracked.next_due, until)

    # -- bulk refresh planning ---------------------------------------------------------------------

    def pages_needed(self, oldest_created_at: int) -> int:
        """Estimated list pages to walk, newest first, until `oldest_created_at` is passed."""
        if self.page_marks and oldest_created_at >= self.page_marks[-1]:
            # marks are descending; count pages whose last item is still newer than the target, plus one
            descending = [-m for m in self.page_marks]
            return bisect.bisect_left(descending, -oldest_created_at) + 1
        newer = sum(1 for b in self.batches.values() if b.created_at is not None and b.created_at >= oldest_created_at)
        return max(1, math.ceil(newer * self.density / LIST_PAGE_SIZE))

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
        budget = math.ceil(count * self.density / LIST_PAGE_SIZE) + 1
        if placed:
            budget = max(budget, self.pages_needed(min(placed)))
        return (None, budget) if 2 * budget <= count else None

    def learn_walk(self, marks: list[int], items: int, tracked_seen: int) -> None:
        """Remember the shape of the last walk, so the next plan estimates pages better."""
        if marks:
            self.page_marks = marks
        if tracked_seen:
            self.density = max(1.0, items / tracked_seen)
