"""How tracked batches look to the control API, `status`, `list` and the dashboard: plain JSON data."""

from __future__ import annotations

import math
from typing import Any

from poller.store.base import ACTIVE, TrackedBatch


def counts_of(batch: TrackedBatch) -> dict[str, int] | None:
    counts = batch.knowledge.counts
    return None if counts is None else counts.as_dict()


def batch_view(batch: TrackedBatch, now: float) -> dict[str, Any]:
    """One tracked batch: its state, status, normalized counts, estimated completion at `now`, schedule
    and (when read) its raw body."""
    return {
        "id": batch.id,
        "source": batch.source,
        "state": batch.state,
        "status": batch.knowledge.status,
        "sequence": batch.knowledge.sequence,
        "request_counts": counts_of(batch),
        "eta": batch.knowledge.eta(now) if batch.state == ACTIVE else None,
        "created_at": batch.created_at,
        "updated_at": batch.updated_at,
        "next_poll_at": batch.next_due if batch.state == ACTIVE and math.isfinite(batch.next_due) else None,
        "error_streak": batch.error_streak,
        "origin": batch.origin,
        "batch": batch.raw,
    }
