"""Transition detection: from what we knew of a batch and what the API now shows, the events to emit.

Pure: the caller passes the detection time. Guarantees, for one batch:
- one event per status entered, missed statuses reconstructed from the batch's own ``*_at`` fields
  and emitted in lifecycle order;
- never the same (batch, status) twice; a backwards or unknown status emits nothing (a warning instead);
- `sequence` increases strictly with every event;
- at most one ``batch.progress`` per `progress_interval`, one ``batch.stalled`` per stall and one
  ``batch.expiring``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from poller.events import make_event
from poller.models import FINAL_STATUSES, KNOWN_STATUSES, LIFECYCLE, Batch, Event

_RANK = {status: rank for rank, status in enumerate(LIFECYCLE)} | dict.fromkeys(FINAL_STATUSES, len(LIFECYCLE))
#: Statuses that may be reconstructed between the one we stored and the one we see, in lifecycle order.
_INTERMEDIATE = ("in_progress", "finalizing", "cancelling")
_EXPIRY_WATCHED = frozenset({"validating", "in_progress"})

Counts = tuple[int, int, int]


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


@dataclass(frozen=True, slots=True)
class Policy:
    progress: bool = True
    progress_interval: float = 60.0
    stall_after: float = 1800.0
    expiry_warning: float = 3600.0


@dataclass(frozen=True, slots=True)
class Detection:
    knowledge: Knowledge
    events: list[Event] = field(default_factory=list)
    warning: str | None = None

    @property
    def status_changed(self) -> bool:
        return any(e.type not in {"batch.progress", "batch.stalled", "batch.expiring"} for e in self.events)


def is_final(status: str | None) -> bool:
    return status in FINAL_STATUSES


def _counts(batch: Batch) -> Counts | None:
    rc = batch.request_counts
    return None if rc is None else (rc.completed, rc.failed, rc.total)


class _Emitter:
    """Numbers and builds the events of one detection."""

    def __init__(self, source: str, batch: Batch, sequence: int, now: float) -> None:
        self.source, self.batch, self.sequence, self.now = source, batch, sequence, now
        self.events: list[Event] = []

    def __call__(self, event_type: str, entered: str, prev: str | None, created: int | None, disc: str = "") -> None:
        self.sequence += 1
        self.events.append(
            make_event(
                source=self.source,
                batch=self.batch,
                event_type=event_type,
                status=entered,
                previous_status=prev,
                sequence=self.sequence,
                created_at=created if created is not None else int(self.now),
                detected_at=self.now,
                discriminator=disc,
            )
        )


def _status_events(known: Knowledge, batch: Batch, emit: _Emitter) -> tuple[frozenset[str], str | None]:
    """Emit the statuses entered since `known`; returns the statuses seen and a warning if ignored."""
    status, previous, seen = batch.status, known.status, set(known.seen)
    if previous is None:
        if status not in seen:  # seen before means tracked before: that status was announced already
            emit(f"batch.{status}", status, None, batch.status_time(status))
        return frozenset({*seen, status}), None
    if status == previous:
        return known.seen, None
    if _RANK[status] <= _RANK[previous] or status in seen:
        return known.seen, f"status went backwards from {previous!r} to {status!r}; ignored"
    path = [s for s in _INTERMEDIATE if _RANK[previous] < _RANK[s] < _RANK[status] and batch.status_time(s) is not None]
    prev = previous
    for entered in [*path, status]:
        if entered not in seen:
            emit(f"batch.{entered}", entered, prev, batch.status_time(entered))
            seen.add(entered)
            prev = entered
    return frozenset(seen), None


def _signal_events(known: Knowledge, new: Knowledge, batch: Batch, policy: Policy, emit: _Emitter) -> Knowledge:
    """Emit progress, stall and expiry events for a batch whose status did not change this poll."""
    now, status, counts = emit.now, batch.status, new.counts
    if (
        policy.progress
        and counts is not None
        and counts != (known.progress_counts or known.counts)
        and (known.progress_at is None or now - known.progress_at >= policy.progress_interval)
    ):
        emit("batch.progress", status, status, None, "{}/{}/{}".format(*counts))
        new = replace(new, progress_counts=counts, progress_at=now)
    changed_at = new.counts_changed_at if new.counts_changed_at is not None else now
    stalled = status == "in_progress" and counts is not None and now - changed_at >= policy.stall_after
    if stalled and counts is not None and known.stalled_at_counts != counts:
        emit("batch.stalled", status, status, None, "{}/{}/{}".format(*counts))
        new = replace(new, stalled_at_counts=counts)
    expires_at = batch.expires_at
    watched = status in _EXPIRY_WATCHED and not known.expiring_sent and expires_at is not None
    if watched and expires_at is not None and expires_at - now <= policy.expiry_warning:
        emit("batch.expiring", status, status, None)
        new = replace(new, expiring_sent=True)
    return new


def detect(source: str, known: Knowledge, batch: Batch, now: float, policy: Policy) -> Detection:
    """Compare `batch` with `known`; return the new knowledge and the events to emit, in order."""
    if batch.status not in KNOWN_STATUSES:
        return Detection(known, warning=f"unknown status {batch.status!r}")
    emit = _Emitter(source, batch, known.sequence, now)
    seen, warning = _status_events(known, batch, emit)
    if warning:
        return Detection(known, warning=warning)
    counts = _counts(batch)
    entered = known.status != batch.status
    new = replace(
        known,
        status=batch.status,
        seen=seen,
        counts=counts,
        # a status event carries the counts, so progress is measured from there on
        progress_counts=counts if entered else known.progress_counts,
        counts_changed_at=now if counts != known.counts or known.counts_changed_at is None else known.counts_changed_at,
    )
    if known.status == batch.status and not is_final(batch.status):
        new = _signal_events(known, new, batch, policy, emit)
    return Detection(replace(new, sequence=emit.sequence), emit.events)


def pruned_event(source: str, known: Knowledge, batch: Batch, now: float) -> tuple[Knowledge, Event]:
    """The internal event that tells sinks a batch left tracking (MQTT clears its retained state)."""
    seq = known.sequence + 1
    event = make_event(
        source=source,
        batch=batch,
        event_type="batch.pruned",
        status=known.status or batch.status,
        previous_status=known.status,
        sequence=seq,
        created_at=int(now),
        detected_at=now,
        discriminator=str(seq),  # a batch re-tracked and pruned again needs a new notice
    )
    return replace(known, sequence=seq), event
