"""The lifecycle every simulated batch follows, whatever provider renders it.

A batch's phases are drawn from a seeded RNG when it is created and evaluated lazily against the clock,
so there are no background tasks. Statuses here are the common lifecycle (`poller.domain.lifecycle`);
each provider's simulator maps them onto its own wire statuses.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, TypeVar, get_args

Outcome = Literal["completed", "failed", "expired"]
OUTCOMES: Final[tuple[str, ...]] = get_args(Outcome)
_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass(frozen=True)
class SimProfile:
    """How batches behave: phase durations in simulated seconds (min, max) and outcome odds."""

    validating_s: tuple[float, float] = (5.0, 120.0)
    in_progress_s: tuple[float, float] = (60.0, 3_600.0)
    finalizing_s: tuple[float, float] = (5.0, 300.0)
    cancelling_s: tuple[float, float] = (2.0, 120.0)
    p_failed: float = 0.04
    p_expired: float = 0.02
    requests: tuple[int, int] = (10, 1_000)
    request_failure_rate: tuple[float, float] = (0.0, 0.03)
    #: Share of the requests an expiring batch had finished by the deadline.
    expired_progress: tuple[float, float] = (0.2, 0.9)
    tokens_in_per_request: tuple[int, int] = (50, 1_500)
    tokens_out_per_request: tuple[int, int] = (10, 600)
    models: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "/v1/embeddings": ("text-embedding-3-small", "text-embedding-3-large"),
            "*": ("gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "gpt-4.1-mini-2025-04-14"),
        }
    )

    def __post_init__(self) -> None:
        for name in ("validating_s", "in_progress_s", "finalizing_s", "cancelling_s", "requests"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range 0 <= min <= max")
        if min(self.p_failed, self.p_expired) < 0 or self.p_failed + self.p_expired > 1:
            raise ValueError("p_failed and p_expired must be non-negative and sum to at most 1")


@dataclass(frozen=True, slots=True)
class Phases:
    outcome: Outcome
    t_in_progress: float
    t_finalizing: float
    t_end: float


def plan_phases(rng: random.Random, profile: SimProfile, t0: float, window: int, outcome: Outcome | None) -> Phases:
    """Draw when a batch created at `t0` with a `window`-second deadline enters each phase."""
    if outcome is not None and outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
    p = profile
    deadline = math.floor(t0) + window
    if outcome is None:
        roll = rng.random()
        outcome = "failed" if roll < p.p_failed else "expired" if roll < p.p_failed + p.p_expired else "completed"
    validating = min(rng.uniform(*p.validating_s), window / 4)
    in_progress = rng.uniform(*p.in_progress_s)
    finalizing = rng.uniform(*p.finalizing_s)
    budget = deadline - 1 - (t0 + validating)
    if in_progress + finalizing > budget:  # a completed batch always beats its deadline
        shrink = budget / (in_progress + finalizing)
        in_progress, finalizing = in_progress * shrink, finalizing * shrink
    t_in_progress = t0 + validating
    t_finalizing = float(deadline) if outcome == "expired" else t_in_progress + in_progress
    return Phases(outcome, t_in_progress, t_finalizing, t_finalizing + finalizing)


@dataclass(kw_only=True)
class SimBatch:
    """One simulated batch's lifecycle in simulated epoch seconds; providers subclass it with their fields."""

    id: str
    seq: int
    t0: float
    created_at: int
    deadline: int
    metadata: dict[str, str] | None
    outcome: Outcome
    t_in_progress: float
    t_finalizing: float
    t_end: float
    total: int
    failure_rate: float
    expired_progress: float
    cancelling_s: float
    t_cancel: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.created_at, self.seq)

    def status_at(self, now: float) -> str:
        """The common-lifecycle status at `now`."""
        if self.t_cancel is not None and now >= self.t_cancel:
            return "cancelled" if now >= self.t_cancel + self.cancelling_s else "cancelling"
        if now < self.t_in_progress:
            return "validating"
        if self.outcome == "failed":
            return "failed"
        if now < self.t_finalizing:
            return "in_progress"
        if self.outcome == "expired":
            return "expired"
        return "finalizing" if now < self.t_end else "completed"

    def progress_at(self, now: float) -> float:
        """Share of requests finished at `now` (before any cancel)."""
        if self.outcome == "failed" or now < self.t_in_progress:
            return 0.0
        reach = self.expired_progress if self.outcome == "expired" else 1.0
        span = self.t_finalizing - self.t_in_progress
        if span <= 0 or now >= self.t_finalizing:
            return reach
        return reach * (now - self.t_in_progress) / span

    def counts_at(self, now: float) -> dict[str, int]:
        """Requests finished by `now`: total, completed (succeeded) and failed; frozen by a cancel."""
        frozen = now if self.t_cancel is None else min(now, self.t_cancel)
        if self.outcome == "failed" or frozen < self.t_in_progress:
            return {"total": 0, "completed": 0, "failed": 0}
        done = math.floor(self.total * self.progress_at(frozen))
        failed = math.floor(done * self.failure_rate)
        return {"total": self.total, "completed": done - failed, "failed": failed}

    def entered_at(self, status: str, now: float) -> float | None:  # noqa: PLR0911 - one rule per status
        """When the batch entered a common status, if it has by `now` (the source of `*_at` stamps)."""
        seen = min(now, self.t_cancel) if self.t_cancel is not None else now
        current = self.status_at(now)
        match status:
            case "validating":
                return self.t0
            case "in_progress":
                return self.t_in_progress if self.outcome != "failed" and seen >= self.t_in_progress else None
            case "finalizing":
                return self.t_finalizing if self.outcome == "completed" and seen >= self.t_finalizing else None
            case "cancelling":
                return self.t_cancel if self.t_cancel is not None and now >= self.t_cancel else None
            case "failed":
                return self.t_in_progress if current == "failed" else None
            case "expired":
                return self.t_finalizing if current == "expired" else None
            case "completed":
                return self.t_end if current == "completed" else None
            case "cancelled":
                done = self.t_cancel is not None and current == "cancelled"
                return self.t_cancel + self.cancelling_s if done and self.t_cancel is not None else None
        return None


def new_id(rng: random.Random, prefix: str, length: int, taken: Iterable[str] = ()) -> str:
    taken = set(taken)
    while True:
        candidate = prefix + "".join(rng.choices(_ID_ALPHABET, k=length))
        if candidate not in taken:
            return candidate


B = TypeVar("B", bound=SimBatch)


class BatchBook(Generic[B]):
    """The batches of one simulator, by id and in creation order (ties broken by creation sequence)."""

    def __init__(self) -> None:
        self.by_id: dict[str, B] = {}
        self._order: list[tuple[int, int, str]] = []  # (created_at, seq, id), oldest first

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self.by_id

    def get(self, batch_id: str) -> B | None:
        return self.by_id.get(batch_id)

    def add(self, records: list[B]) -> None:
        """Add records keeping the order sorted; appends in order are O(1), a backdated bulk sorts once."""
        for r in records:
            self.by_id[r.id] = r
        entries = [(*r.key, r.id) for r in records]
        if len(entries) == 1:
            bisect.insort(self._order, entries[0])
            return
        order, first = self._order, max(len(self._order) - 1, 0)
        order.extend(entries)
        if any(order[i] > order[i + 1] for i in range(first, len(order) - 1)):
            order.sort()

    def before(self, after: str | None, limit: int) -> tuple[list[B], bool] | None:
        """Up to `limit` batches older than `after` (or the newest), newest first, and whether more remain.

        None when `after` names no batch.
        """
        if after is None:
            stop = len(self._order)
        else:
            anchor = self.by_id.get(after)
            if anchor is None:
                return None
            stop = bisect.bisect_left(self._order, (*anchor.key, anchor.id))
        start = max(0, stop - limit)
        return [self.by_id[e[2]] for e in reversed(self._order[start:stop])], start > 0

    def newest_first(self) -> list[B]:
        return [self.by_id[e[2]] for e in reversed(self._order)]

    def oldest_first(self) -> list[B]:
        return [self.by_id[e[2]] for e in self._order]
