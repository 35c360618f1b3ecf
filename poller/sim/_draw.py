"""Small pieces the Mistral, Together and OpenRouter simulators share: drawing one batch's lifecycle,
ids, and their timestamp formats."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime
from typing import Any

from poller.sim.lifecycle import Outcome, SimProfile, plan_phases


def draw_lifecycle(
    rng: random.Random, profile: SimProfile, t0: float, window: int, outcome: Outcome | None
) -> dict[str, Any]:
    """The `SimBatch` fields of a batch created at `t0` with a `window`-second deadline (all but id and seq)."""
    phases = plan_phases(rng, profile, t0, window, outcome)
    return {
        "t0": t0,
        "created_at": math.floor(t0),
        "deadline": math.floor(t0) + window,
        "outcome": phases.outcome,
        "t_in_progress": phases.t_in_progress,
        "t_finalizing": phases.t_finalizing,
        "t_end": phases.t_end,
        "total": rng.randint(*profile.requests),
        "failure_rate": rng.uniform(*profile.request_failure_rate),
        "expired_progress": rng.uniform(*profile.expired_progress),
        "cancelling_s": rng.uniform(*profile.cancelling_s),
    }


def new_uuid(rng: random.Random, taken: dict[str, Any]) -> str:
    """A random (seeded) version-4 UUID not in `taken`."""
    while True:
        candidate = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if candidate not in taken:
            return candidate


def rfc3339(when: float) -> str:
    """Epoch seconds as an RFC 3339 UTC string with milliseconds, as Go services write them."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_before_cancel(record: Any) -> str:
    """The common status a cancelled batch had just before the cancel (for APIs without cancelling)."""
    t_cancel = record.t_cancel
    assert t_cancel is not None
    return str(record.status_at(math.nextafter(t_cancel, -math.inf)))
