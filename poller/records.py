"""Plain records shared by the tracker (pure logic) and the store (SQLite): a tracked batch, a new event."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from poller.transitions import Knowledge

ACTIVE, FINAL, GONE = "active", "final", "gone"


@dataclass(slots=True)
class TrackedBatch:
    """One tracked batch as the daemon holds it in memory; the store's row mirrors it."""

    source: str
    id: str
    origin: str
    added_at: float
    state: str = ACTIVE
    knowledge: Knowledge = field(default_factory=Knowledge)
    created_at: int | None = None
    snapshot: dict[str, Any] | None = None
    next_due: float = 0.0
    interval: float | None = None
    error_streak: int = 0
    not_found: int = 0
    updated_at: float | None = None
    finished_at: float | None = None

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
