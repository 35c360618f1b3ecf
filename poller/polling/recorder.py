"""The recorder: the one place events become durable rows.

Refresh, discovery and pruning hand it what detection found; it builds each event (the published
envelope, with a deterministic id), routes it to the sinks that take it, writes batch rows, events and
outbox rows in one transaction, then wakes the delivery workers. Nothing below it calls back up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import structlog

from poller.domain.events import build_event, encode
from poller.domain.snapshot import Snapshot
from poller.domain.transitions import Change
from poller.metrics import Metrics
from poller.polling.tracker import Observation
from poller.store.base import EventLog, NewEvent, Recorded, TrackedBatch, Write

log = structlog.get_logger("poller.recorder")

#: (event type, the batch's metadata, source) -> the names of the sinks that take the event.
Router = Callable[[str, Mapping[str, str] | None, str], list[str]]


class Recorder:
    def __init__(
        self,
        store: EventLog,
        router: Router,
        metrics: Metrics,
        *,
        on_recorded: Callable[[Recorded], None] = lambda _r: None,
    ) -> None:
        self.store = store
        self.router = router
        self.metrics = metrics
        self.on_recorded = on_recorded

    def _new_events(
        self,
        source: str,
        provider: str,
        snap: Snapshot,
        changes: Sequence[Change],
        now: float,
        *,
        eta: int | None = None,
    ) -> list[NewEvent]:
        out = []
        for change in changes:
            event = build_event(source, provider, snap, change, now, eta=eta)
            sinks = self.router(event.type, snap.metadata, source)
            out.append(NewEvent(event.id, event.type, change.sequence, event.created_at, now, encode(event), sinks))
        return out

    async def record(
        self,
        source: str,
        provider: str,
        observations: Sequence[Observation],
        now: float,
        *,
        rows: Sequence[TrackedBatch] = (),
    ) -> Recorded:
        """Write what a poll found (and plain `rows`, e.g. batches marked gone) in one transaction."""
        writes: list[Write] = [Write(row) for row in rows]
        logged: list[tuple[Snapshot, NewEvent, Change]] = []
        for obs in observations:
            if obs.row is None:
                continue
            events = (
                self._new_events(source, provider, obs.snapshot, obs.changes, now, eta=obs.row.knowledge.eta(now))
                if obs.changes
                else []
            )
            writes.append(Write(obs.row, events, obs.body, obs.expected_sequence))
            logged += zip((obs.snapshot,) * len(events), events, obs.changes, strict=True)
        if not writes:
            return Recorded()
        recorded = await self.store.record(writes, now)
        conflicted = set(recorded.conflicts)
        for snap, event, change in logged:
            if (source, snap.id) in conflicted:
                continue
            self.metrics.transitions.labels(source, event.type).inc()
            log.info(
                event.type,
                source=source,
                batch_id=snap.id,
                status=change.status,
                previous_status=change.previous_status,
                provider_status=snap.provider_status,
                event_id=event.id,
                sequence=change.sequence,
            )
        if recorded.enqueued or logged:
            self.on_recorded(recorded)
        return recorded

    async def record_orphan(self, source: str, provider: str, snap: Snapshot, change: Change, now: float) -> int:
        """Record an event for a batch that no longer has a row (the prune notice)."""
        [event] = self._new_events(source, provider, snap, [change], now)
        if not event.sinks:
            return 0
        enqueued = await self.store.record_orphan(source, snap.id, event, now)
        if enqueued:
            self.on_recorded(Recorded(enqueued))
        return enqueued
