"""The store's seam: plain records, and the async protocols every store implements (SQLite, the
embedded default; PostgreSQL, shared by replicas). `tests/test_store_contract.py` holds each
implementation to the same behaviour.

Nothing outside a store knows its file, its SQL or how it learns of other writers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from poller.domain.transitions import Knowledge

ACTIVE, FINAL, GONE = "active", "final", "gone"


def default_replica_name() -> str:
    """A replica's name when `[state] replica_name` is not set: `<host name>:<pid>`."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class TrackedBatch:
    """One tracked batch: its schedule and what detection knows of it (the store's row mirrors it).

    `raw` (the provider's last body) is filled only on reads meant for display or pruning; the poll
    loop keeps just `fingerprint`, a stable hash of that body (`codec.fingerprint`, stored with the
    body), to tell whether anything changed.
    """

    source: str
    id: str
    origin: str
    added_at: float
    state: str = ACTIVE
    knowledge: Knowledge = field(default_factory=Knowledge)
    created_at: int | None = None
    next_due: float = 0.0
    interval: float | None = None
    error_streak: int = 0
    not_found: int = 0
    updated_at: float | None = None
    finished_at: float | None = None
    fingerprint: int | None = None
    raw: dict[str, Any] | None = None
    #: In memory only: whether this process saw the body `fingerprint` hashes, and its `expires_at`
    #: (what a list item equal to that body needs to skip validation and detection).
    observed: bool = False
    expires_at: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.id)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to record, with its canonical bytes and the sinks that must deliver it."""

    id: str
    type: str
    sequence: int
    created_at: int
    detected_at: float
    payload: bytes
    sinks: Sequence[str]


@dataclass(frozen=True, slots=True)
class Write:
    """One batch's row and its new events, written together.

    `expected_sequence` is the compare-and-set: the write applies only while the stored row's sequence
    is still that (another writer that got there first wins, and this write is reported as a conflict).
    `body` is the provider's body as JSON text, None to keep the stored one.
    """

    batch: TrackedBatch
    events: Sequence[NewEvent] = ()
    body: str | None = None
    expected_sequence: int | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a `record` call did: outbox rows enqueued, and the batches whose write lost a race."""

    enqueued: int = 0
    conflicts: tuple[tuple[str, str], ...] = ()
    #: The event log's position after the write (for the live stream).
    position: int = 0
    #: Outbox rows this write made the head of their batch's queue (due now), for the delivery workers
    #: to send without reading them back; a store may leave it empty (the workers then read the outbox).
    heads: tuple[OutboxRow, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboxRow:
    sink: str
    event_id: str
    source: str
    batch_id: str
    sequence: int
    attempts: int
    payload: bytes
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """An outbox row as `deliveries` lists it."""

    sink: str
    event_id: str
    batch_id: str
    type: str
    sequence: int
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One recorded event at its position in the event log."""

    position: int
    source: str
    batch_id: str
    type: str
    payload: bytes


class BatchStore(Protocol):
    """Tracked batches, their schedules, and per-source cursors."""

    async def track(self, source: str, ids: Iterable[str], origin: str, now: float) -> list[str]:
        """Track ids not tracked yet (and revive gone ones); returns those added or revived.

        A batch tracked before resumes where its recorded events end: its sequence keeps increasing and
        no status it already announced is announced again.
        """
        ...

    async def untrack(self, source: str, ids: Iterable[str], now: float) -> list[str]:
        """Stop tracking; events and pending deliveries stay, and discovery will not re-adopt them."""
        ...

    async def untracked(self, source: str, ids: Iterable[str]) -> set[str]:
        """Which of `ids` a user untracked (discovery leaves those alone until tracked again by hand)."""
        ...

    async def batches(
        self, source: str | None = None, states: Sequence[str] | None = None, *, with_raw: bool = False
    ) -> list[TrackedBatch]: ...

    async def batch(self, source: str, batch_id: str) -> TrackedBatch | None:
        """One row, with its raw body."""
        ...

    async def save_schedule(self, batches: Iterable[TrackedBatch]) -> None:
        """Persist only the schedule fields (on shutdown), so a restart keeps each batch's pace."""
        ...

    async def prune(self, before: float, source: str | None = None) -> list[TrackedBatch]:
        """Forget final and gone batches that finished before `before`; returns them with their bodies.

        Delivered outbox rows and events of forgotten batches go too, once no sink still needs them.
        """
        ...

    async def cursor(self, source: str, name: str) -> str | None: ...

    async def set_cursor(self, source: str, name: str, value: str) -> None: ...


class EventLog(Protocol):
    """Recorded events, readable in order from a monotonic position."""

    async def record(self, writes: Sequence[Write], now: float) -> Recorded:
        """Write batch rows, their new events and the events' outbox rows in one transaction.

        An event recorded before is never enqueued again. A row untracked meanwhile is not recreated
        and its events are dropped with it; a row whose sequence moved on (compare-and-set) is a conflict.
        """
        ...

    async def record_orphan(self, source: str, batch_id: str, event: NewEvent, now: float) -> int:
        """Record an event of a batch that may no longer have a row (the prune notice)."""
        ...

    async def events_for(self, source: str | None, batch_id: str) -> list[dict[str, Any]]:
        """A batch's recorded events, in sequence order."""
        ...

    async def read_events(
        self,
        after: int,
        limit: int,
        *,
        sources: Sequence[str] = (),
        batch_ids: Sequence[str] = (),
        types: Sequence[str] = (),
    ) -> list[LoggedEvent]:
        """Events after position `after`, oldest first, at most `limit`, filtered when filters are given."""
        ...

    async def last_position(self) -> int: ...


class Outbox(Protocol):
    """Per-sink delivery queues: one queue per batch, only its head (lowest pending sequence) is ever due."""

    async def claim_heads(self, sink: str, now: float, busy: set[tuple[str, str]], limit: int) -> list[OutboxRow]:
        """Due heads of queues not in `busy`, oldest first, at most `limit`, claimed for this process."""
        ...

    async def next_ready_at(self, sink: str, busy: set[tuple[str, str]]) -> float | None:
        """When the earliest head not in `busy` may be sent; None when none waits."""
        ...

    async def mark_delivered(self, sink: str, event_ids: Sequence[str], now: float) -> None: ...

    async def mark_dead(self, sink: str, event_id: str, error: str, now: float) -> None: ...

    async def mark_retry(self, sink: str, event_id: str, next_attempt_at: float, error: str, now: float) -> None: ...

    async def deliveries(
        self, sink: str | None = None, states: Sequence[str] = ("pending", "dead")
    ) -> list[Delivery]: ...

    async def redeliver(self, sink: str | None, event_id: str | None, now: float) -> int:
        """Put dead (or, for one named event, delivered) rows back in their queues; returns how many."""
        ...

    async def outbox_stats(self) -> dict[str, dict[str, Any]]:
        """Per sink: pending and dead counts and the oldest pending row's enqueue time."""
        ...


class Leases(Protocol):
    """One lease per source, so that one replica at a time polls it (list walks and rate limits are per key)."""

    async def acquire_leases(self, holder: str, sources: Sequence[str], now: float, ttl: float) -> list[str]:
        """Take or renew, until `now + ttl`, each source's lease that is free, expired or `holder`'s already;
        returns the sources `holder` now holds, in the order asked."""
        ...

    async def release_leases(self, holder: str, sources: Sequence[str] | None = None) -> None:
        """Give up `holder`'s leases (all of them when `sources` is None) so another replica takes over at once."""
        ...

    async def leases(self) -> dict[str, tuple[str, float]]:
        """Every lease as source -> (holder, expires_at), expired ones included."""
        ...


class Store(BatchStore, EventLog, Outbox, Leases, Protocol):
    """A whole store, opened as an async context manager."""

    #: Where it lives, for logs and `status` (never a password).
    description: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def changes(self) -> AsyncIterator[None]:
        """Yields whenever another process (the CLI, another replica) committed a change."""
        ...
