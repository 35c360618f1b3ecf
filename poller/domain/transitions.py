"""Transition detection: from what we knew of a batch and a new snapshot of it, the changes to record.

Pure: the caller passes the detection time. Guarantees, for one batch:
- one change per status entered; statuses missed between two polls (or before the first) are
  reconstructed from the provider's stamps (`Snapshot.entered`) and from what a status implies, and
  come in lifecycle order;
- never the same (batch, status) twice; a backwards or unknown status changes nothing (a warning instead);
- `sequence` increases strictly with every change;
- at most one ``batch.progress`` per `progress_interval`, one ``batch.stalled`` per stall and one
  ``batch.expiring``;
- a batch first seen part-way reports progress from a point of its first interval fixed by its id
  (`progress_phase`), so batches first seen together (a daemon started among thousands) spread their
  progress over the interval instead of all reporting in one poll.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

from poller.domain.eta import Anchors, advance, completion, pack_anchors
from poller.domain.lifecycle import EXPIRY_WATCHED, IMPLIED, INTERMEDIATE, RANK, is_final
from poller.domain.snapshot import Counts, Snapshot

SIGNAL_TYPES = frozenset({"batch.progress", "batch.stalled", "batch.expiring"})
#: One shared set per combination of statuses seen (a few at most): a new one per batch was a fifth of
#: the memory a tracked batch holds.
_SEEN: dict[frozenset[str], frozenset[str]] = {}


@dataclass(frozen=True, slots=True)
class Knowledge:
    """What detection remembers of one batch between polls (persisted by the store)."""

    status: str | None = None
    seen: frozenset[str] = frozenset()
    sequence: int = 0
    counts: Counts | None = None
    counts_changed_at: float | None = None
    progress_counts: Counts | None = None
    progress_at: float | None = None
    stalled_at_counts: Counts | None = None
    expiring_sent: bool = False
    #: (time, finished requests) while in progress, when the counts moved: the pace the ETA comes from.
    anchors: Anchors = b""

    def eta(self, now: float) -> int | None:
        """When (Unix seconds) the batch should have finished its requests; None when unknown or not in progress."""
        if self.status != "in_progress" or self.counts is None:
            return None
        return completion(self.anchors, self.counts.total, now)


@dataclass(frozen=True, slots=True)
class Policy:
    progress: bool = True
    progress_interval: float = 60.0
    stall_after: float = 1800.0
    expiry_warning: float = 3600.0


@dataclass(frozen=True, slots=True)
class Change:
    """One thing that happened to a batch: a status entered, progress, a stall, approaching expiry.

    `occurred_at` is when it happened by the provider's own stamps, or the detection time where the
    provider stamps nothing (`dated_by_detection`). `discriminator` tells apart repeated changes of
    one type (progress at other counts, a later stall), so each gets its own event id.
    """

    type: str
    status: str
    previous_status: str | None
    sequence: int
    occurred_at: int
    dated_by_detection: bool = False
    discriminator: str = ""

    @property
    def is_status(self) -> bool:
        return self.type not in SIGNAL_TYPES and self.type != "batch.pruned"


@dataclass(frozen=True, slots=True)
class Detection:
    knowledge: Knowledge
    changes: list[Change] = field(default_factory=list)
    warning: str | None = None

    @property
    def status_changed(self) -> bool:
        return any(c.is_status for c in self.changes)


class _Emitter:
    """Numbers the changes of one detection."""

    def __init__(self, sequence: int, now: float) -> None:
        self.sequence, self.now = sequence, now
        self.changes: list[Change] = []

    def __call__(self, kind: str, status: str, prev: str | None, when: int | None, disc: str = "") -> None:
        self.sequence += 1
        dated = when is None
        occurred = int(self.now) if when is None else when
        self.changes.append(Change(kind, status, prev, self.sequence, occurred, dated, disc))


def _status_changes(known: Knowledge, snap: Snapshot, emit: _Emitter) -> tuple[frozenset[str], str | None]:
    """Emit the statuses entered since `known`; returns the statuses seen and a warning if ignored."""
    status, previous, seen = snap.status, known.status, set(known.seen)
    assert status is not None
    if status == previous:
        return known.seen, None
    if previous is not None and (RANK[status] <= RANK[previous] or status in seen):
        return known.seen, f"status went backwards from {previous!r} to {status!r}; ignored"
    floor = -1 if previous is None else RANK[previous]
    implied = IMPLIED.get(status, frozenset())
    path = [
        s for s in INTERMEDIATE if floor < RANK[s] < RANK[status] and (snap.entered_at(s) is not None or s in implied)
    ]
    prev = previous
    for entered in [*path, status]:
        if entered not in seen:  # seen before means tracked before: that status was announced already
            emit(f"batch.{entered}", entered, prev, snap.entered_at(entered))
            seen.add(entered)
        prev = entered
    entered_set = frozenset(seen)
    return _SEEN.setdefault(entered_set, entered_set), None


def _signal_changes(known: Knowledge, new: Knowledge, snap: Snapshot, policy: Policy, emit: _Emitter) -> Knowledge:
    """Emit progress, stall and expiry changes for a batch whose status did not change this poll."""
    now, status, counts = emit.now, snap.status, new.counts
    assert status is not None
    if (
        policy.progress
        and counts is not None
        and counts != (known.progress_counts or known.counts)
        and (known.progress_at is None or now - known.progress_at >= policy.progress_interval)
    ):
        emit("batch.progress", status, status, None, _counts_key(counts))
        new = replace(new, progress_counts=counts, progress_at=now)
    changed_at = new.counts_changed_at if new.counts_changed_at is not None else now
    stalled = status == "in_progress" and counts is not None and now - changed_at >= policy.stall_after
    if stalled and counts is not None and known.stalled_at_counts != counts:
        emit("batch.stalled", status, status, None, _counts_key(counts))
        new = replace(new, stalled_at_counts=counts)
    expires_at = snap.expires_at
    watched = status in EXPIRY_WATCHED and not known.expiring_sent and expires_at is not None
    if watched and expires_at is not None and expires_at - now <= policy.expiry_warning:
        emit("batch.expiring", status, status, None)
        new = replace(new, expiring_sent=True)
    return new


def stalled(known: Knowledge) -> bool:
    """Whether the batch is stalled now: `batch.stalled` was sent at the counts it still has, in progress."""
    return known.status == "in_progress" and known.counts is not None and known.stalled_at_counts == known.counts


def _counts_key(counts: Counts) -> str:
    return f"{counts.completed}/{counts.failed}/{counts.total}"


def detect(known: Knowledge, snap: Snapshot, now: float, policy: Policy) -> Detection:
    """Compare `snap` with `known`; return the new knowledge and the changes to record, in order."""
    if snap.status is None:
        return Detection(known, warning=f"unknown status {snap.provider_status!r}")
    emit = _Emitter(known.sequence, now)
    seen, warning = _status_changes(known, snap, emit)
    if warning:
        return Detection(known, warning=warning)
    counts = snap.counts
    entered = known.status != snap.status
    new = Knowledge(  # every field, built once (`replace` costs several times more, once per poll)
        status=snap.status,
        seen=seen,
        sequence=known.sequence,
        counts=counts,
        counts_changed_at=now if counts != known.counts or known.counts_changed_at is None else known.counts_changed_at,
        # a status event carries the counts, so progress is measured from there on
        progress_counts=counts if entered else known.progress_counts,
        progress_at=_progress_at(known, snap, now, policy),
        stalled_at_counts=known.stalled_at_counts,
        expiring_sent=known.expiring_sent,
        anchors=_anchors(known, snap, now),
    )
    if not entered and not is_final(snap.status):
        new = _signal_changes(known, new, snap, policy, emit)
    if emit.sequence != new.sequence:
        new = replace(new, sequence=emit.sequence)
    return Detection(new, emit.changes)


def progress_phase(batch_id: str, interval: float) -> float:
    """Where in its first `interval` a batch first seen part-way may report progress: seconds in
    [0, interval), the same for the same id on every replica and after every restart."""
    return zlib.crc32(batch_id.encode("utf-8", "surrogatepass")) / 2**32 * interval


def _progress_at(known: Knowledge, snap: Snapshot, now: float, policy: Policy) -> float | None:
    """The progress throttle's reference time: kept once known; at first sight `now` less the batch's phase,
    so its first progress comes within one interval, at a point of it fixed by its id."""
    if known.status is not None or not policy.progress or snap.status is None or is_final(snap.status):
        return known.progress_at
    return now - progress_phase(snap.id, policy.progress_interval)


def _anchors(known: Knowledge, snap: Snapshot, now: float) -> Anchors:
    """The pace samples after `snap`: kept while in progress, dropped in any other status."""
    counts = snap.counts
    if snap.status != "in_progress" or counts is None or counts.total <= 0:
        return b""
    anchors = known.anchors if known.status == "in_progress" else b""
    started = snap.entered_at("in_progress")
    if not anchors and counts.finished > 0 and started is not None and started < now:
        # First seen part-way: the provider's stamp of when it started, at no requests done, is a sample too.
        anchors = pack_anchors([(started, 0)])
    return advance(anchors, now, counts.finished)


def quiet(known: Knowledge, snap: Snapshot, now: float, policy: Policy) -> bool:
    """Whether `detect(known, snap, now, policy)` would change nothing: the fast path for a batch whose
    body equals the one `known` was formed from (most batches on most polls). False whenever unsure.
    """
    if snap.status is None or snap.status != known.status or snap.counts != known.counts:
        return False
    return quiet_as_known(known, snap.expires_at, now, policy)


def quiet_as_known(known: Knowledge, expires_at: int | None, now: float, policy: Policy) -> bool:
    """Whether a batch seen again exactly as `known` (and its `expires_at`) would change nothing now:
    no throttled progress, stall or expiry warning has come due. False whenever unsure."""
    status, counts = known.status, known.counts
    if status is None or known.counts_changed_at is None:
        return False
    if is_final(status):
        return True
    pending = known.progress_counts
    progress_due = known.progress_at is None or now - known.progress_at >= policy.progress_interval
    if policy.progress and counts is not None and pending is not None and pending != counts and progress_due:
        return False
    stall_due = now - known.counts_changed_at >= policy.stall_after
    if status == "in_progress" and counts is not None and known.stalled_at_counts != counts and stall_due:
        return False
    expiry_due = expires_at is not None and expires_at - now <= policy.expiry_warning
    return not (status in EXPIRY_WATCHED and not known.expiring_sent and expiry_due)


def pruned(known: Knowledge, now: float) -> tuple[Knowledge, Change]:
    """The internal change that tells sinks a batch left tracking (MQTT clears its retained state)."""
    seq = known.sequence + 1
    status = known.status or "validating"
    # the sequence tells a second prune of a re-tracked batch from the first
    change = Change("batch.pruned", status, known.status, seq, int(now), discriminator=str(seq))
    return replace(known, sequence=seq), change
