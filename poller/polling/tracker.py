"""The tracked set of one source in memory: who is due, what a fetched snapshot or an error means for
a batch, and whether a refresh is cheaper through list pages or one retrieve per batch.

Pure: no I/O; the caller passes `now` and the random source. What it returns (rows to write and the
changes detected) goes to the recorder.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any

from poller.domain.eta import ProgressWindow
from poller.domain.lifecycle import is_final
from poller.domain.schedule import Intervals, Rand, error_delay, page_spacing, retrieve_delay, walk_period
from poller.domain.snapshot import Snapshot
from poller.domain.transitions import Change, Policy, detect, quiet, quiet_as_known
from poller.errors import ApiError
from poller.providers.base import Rebase
from poller.store.base import ACTIVE, FINAL, GONE, TrackedBatch
from poller.store.codec import dump_body, fingerprint

#: A row's fields as `TrackedBatch` takes them, in order: `_copy` is a third of `dataclasses.replace`'s cost,
#: once per batch whose counts moved.
_ROW_FIELDS = attrgetter(*(f.name for f in fields(TrackedBatch) if f.init))


def _copy(row: TrackedBatch) -> TrackedBatch:
    """`dataclasses.replace(row)`: a copy of the live row, for the recorder to write."""
    return TrackedBatch(*_ROW_FIELDS(row))


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
        self,
        source: str,
        *,
        intervals: Intervals,
        policy: Policy,
        backoff: Backoff,
        rand: Rand,
        page_size: int = 100,
        latency: float = 15.0,
        rate: float = 10.0,
    ) -> None:
        self.source = source
        #: The latency target (`[poll] latency`) and the request budget (requests per second).
        self.latency = latency
        self.rate = rate
        #: Whether list pages refresh this source's batches (else one retrieve each, paced by ETA).
        self.listable = True
        #: When the next walk of the list pages holding active batches starts (-inf before the first).
        self.next_walk = -math.inf
        #: Seconds between walks, from the latency target and the pages the last walk needed.
        self.period = latency
        #: Request-count samples of batches refreshed only by retrieve, for their estimated completion.
        self.progress: dict[str, ProgressWindow] = {}
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
        #: The list pages holding the active batches, as `walk_period` last estimated them.
        self.walk_pages = 1
        #: Seconds per page each recent walk took by itself (`learn_walk`): how far apart the next one's are.
        self.page_work: deque[float] = deque(maxlen=WORK_WINDOW)
        #: Bodies `unchanged` found changed, by batch id: (the item, its text, its fingerprint), which
        #: `body` hands on to `observe` so the item is encoded and hashed once (at most a few pages of them).
        self._bodies: dict[str, tuple[Mapping[str, Any], str, int]] = {}

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
        self.period = self.walk_period()

    def clear(self) -> None:
        """Forget everything, so the next `load` takes the store's rows as they are (another replica's)."""
        self.batches = {}
        self.progress.clear()
        self._bodies.clear()
        self.page_work.clear()
        self.next_walk = -math.inf

    def add(self, row: TrackedBatch) -> None:
        row.raw = None  # the poll loop keeps only the fingerprint
        self.batches[row.id] = row

    def forget(self, batch_id: str) -> None:
        self.batches.pop(batch_id, None)
        self.progress.pop(batch_id, None)

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

    def observe(
        self, snap: Snapshot, body: str, now: float, *, listed: bool = False, body_print: int | None = None
    ) -> Observation | None:
        """Apply a fetched snapshot; None if the batch is not tracked (or no longer active).

        `body` is the snapshot's body text (`dump_body`), `body_print` its fingerprint when known already
        (`body`). `listed` says a list page showed it: its next refresh is the next walk. A retrieved
        batch of a source whose list refreshes it joins that walk too; otherwise it is paced by its status
        interval and its estimated completion.
        """
        tracked = self.batches.get(snap.id)
        if tracked is None or tracked.state != ACTIVE:
            return None
        new_print = fingerprint(body) if body_print is None else body_print
        changed = new_print != tracked.fingerprint
        was_erroring = tracked.error_streak > 0 or tracked.not_found > 0
        if not changed and not was_erroring and quiet(tracked.knowledge, snap, now, self.policy):
            # The fast path: the same body as last time, and no time-based signal due.
            tracked.observed, tracked.expires_at = True, _shared(snap.expires_at)
            status = tracked.knowledge.status or "validating"
            tracked.interval = self.intervals.next(status, tracked.interval, changed=False)
            tracked.next_due = self._next_due(tracked, snap, now, listed)
            return Observation(snap, None)
        expected = tracked.knowledge.sequence
        detection = detect(tracked.knowledge, snap, now, self.policy)
        status = detection.knowledge.status or snap.status or "validating"
        tracked.error_streak = tracked.not_found = 0
        tracked.interval = self.intervals.next(status, tracked.interval, changed=changed)
        if detection.warning:
            tracked.next_due = self._next_due(tracked, snap, now, listed)
            return Observation(snap, None, warning=detection.warning)
        tracked.knowledge = detection.knowledge
        tracked.fingerprint = new_print
        tracked.observed, tracked.expires_at = True, _shared(snap.expires_at)  # what `unchanged` compares against
        tracked.created_at = _shared(snap.created_at)
        tracked.next_due = self._next_due(tracked, snap, now, listed)
        if changed or detection.changes:
            tracked.updated_at = now
        if is_final(status):
            tracked.state, tracked.finished_at, tracked.next_due = FINAL, now, math.inf
            self.progress.pop(tracked.id, None)
        if not (changed or detection.changes or was_erroring):
            return Observation(snap, None)
        return Observation(
            snap, _copy(tracked), detection.changes, body if changed else None, expected_sequence=expected
        )

    def unchanged(self, batch_id: str, item: Mapping[str, Any], now: float) -> int | None:
        """`Provider.unchanged`: the created_at of an active batch this process saw with exactly this body,
        nothing time-based due for it, so the list item needs no validation and no detection; else None."""
        tracked = self.batches.get(batch_id)
        if tracked is None or tracked.state != ACTIVE or not tracked.observed or tracked.created_at is None:
            return None
        body = dump_body(item)
        body_print = fingerprint(body)
        if tracked.error_streak or tracked.not_found or tracked.fingerprint != body_print:
            self._bodies[batch_id] = (item, body, body_print)
            return None
        if not quiet_as_known(tracked.knowledge, tracked.expires_at, now, self.policy):
            self._bodies[batch_id] = (item, body, body_print)
            return None
        return tracked.created_at

    def recounted(self, batch_id: str, item: Mapping[str, Any], rebase: Rebase) -> bool:
        """`Provider.recounted`: whether `item` is the body of an active batch this process saw last but for
        its request counts: put back to the counts detection knows (`rebase`), it has that body's fingerprint.
        Only its counts then need checking; the body they were put back into was checked when it was seen."""
        tracked = self.batches.get(batch_id)
        if tracked is None or tracked.state != ACTIVE or not tracked.observed:
            return False
        counts = tracked.knowledge.counts
        if counts is None or tracked.fingerprint is None:
            return False
        before = rebase(item, counts)
        return before is not None and fingerprint(dump_body(before)) == tracked.fingerprint

    def body(self, snap: Snapshot) -> tuple[str, int]:
        """The body text of `snap` and its fingerprint, for `observe`: the ones `unchanged` computed for the
        same item if it did, else computed now."""
        found = self._bodies.pop(snap.id, None)
        if found is not None and found[0] is snap.raw:
            return found[1], found[2]
        body = dump_body(snap.raw)
        return body, fingerprint(body)

    def seen_unchanged(self, batch_id: str, now: float) -> None:
        """A list page showed the batch as `unchanged` vouched: only its schedule moves (to the next walk)."""
        tracked = self.batches.get(batch_id)
        if tracked is None or tracked.state != ACTIVE:
            return
        status = tracked.knowledge.status or "validating"
        tracked.interval = self.intervals.next(status, tracked.interval, changed=False)
        tracked.next_due = self._walk_due(now)

    def _walk_due(self, now: float) -> float:
        """Dated from the walk, not from the page: every batch of one walk is due at the same time."""
        return self.next_walk if self.next_walk > now else now + self.period

    def _next_due(self, tracked: TrackedBatch, snap: Snapshot, now: float, listed: bool) -> float:
        if listed or self.listable:
            return self._walk_due(now)
        interval = tracked.interval if tracked.interval is not None else self.intervals.default
        eta = None
        counts = snap.counts
        if counts is not None and counts.total > 0:
            window = self.progress.get(tracked.id)
            if window is None:
                window = self.progress[tracked.id] = ProgressWindow()
            window.add(now, counts.finished, counts.total)
            eta = window.eta(now)
        expires_in = None if snap.expires_at is None else snap.expires_at - now
        delay = retrieve_delay(
            interval, floor=self.latency, eta=eta, expires_in=expires_in, cap=self.intervals.max_interval
        )
        return now + delay

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
                return _copy(tracked)
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

    def walk_period(self) -> float:
        """Seconds between walks of the pages that hold the active batches (`schedule.walk_period`)."""
        placed = [b.created_at for b in self.batches.values() if b.state == ACTIVE and b.created_at is not None]
        unplaced = sum(1 for b in self.batches.values() if b.state == ACTIVE and b.created_at is None)
        pages = self.pages_needed(min(placed)) if placed else 0
        self.walk_pages = max(pages, math.ceil(unplaced * self.density / self.page_size), 1)
        return walk_period(self.latency, self.walk_pages, self.rate, cap=self.intervals.max_interval)

    def begin_walk(self, start: float) -> None:
        """A walk of the active pages starts: every batch it shows is next due one period from `start`."""
        self.period = self.walk_period()
        self.next_walk = start + self.period
        self._bodies.clear()  # left by items that were not batches after all, or by pages never applied

    def pull_in(self, due: Sequence[TrackedBatch], now: float) -> list[TrackedBatch]:
        """`due` and every active batch due before the next walk would come: one walk serves them all,
        so due times never stagger page by page (a walk per straggler would cascade).
        """
        horizon = now + self.period
        pulled = [b for b in self.batches.values() if b.state == ACTIVE and b.next_due <= horizon]
        if len(pulled) <= len(due):
            return list(due)
        pulled.sort(key=lambda b: b.next_due)
        return pulled

    def learn_walk(self, marks: list[int], items: int, tracked_seen: int, page_work: float) -> None:
        """Remember the shape of the last walk, so the next plan estimates pages better; `page_work` is
        the seconds per page it took, less any time it only waited on its own pacing (`page_spacing`)."""
        if marks:
            self.page_marks = marks
        if tracked_seen:
            self.density = max(1.0, items / tracked_seen)
        self.page_work.append(page_work)

    def page_spacing(self) -> float:
        """Seconds from one page request of a walk to the next (`schedule.page_spacing`), so that every
        walk reads each page about one period after the walk before did. 0 until a walk is known."""
        return page_spacing(self.period, self.walk_pages, self.page_work)


#: Walks whose page work `page_spacing` looks back on: one heavy walk in the last few sets the pace.
WORK_WINDOW = 4


@functools.lru_cache(maxsize=256)
def _shared(stamp: int | None) -> int | None:
    """One int object for equal stamps among the recent ones (`created_at`, `expires_at`): the batches of a
    list page were mostly created within seconds of each other, and an int of its own for each of the two
    was 64 bytes times every tracked batch."""
    return stamp
