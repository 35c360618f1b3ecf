"""When to try a failed delivery again: the sink's schedule (±20 % jitter) or, without one, capped
exponential backoff with full jitter, forever. A receiver's Retry-After is a floor."""

from __future__ import annotations

from collections.abc import Sequence

from poller.domain.schedule import Rand, full_jitter
from poller.errors import DeliveryError

#: Without a schedule: first retry after about a second, never more than a minute apart.
FOREVER_BASE = 1.0
FOREVER_CAP = 60.0


def retry_delay(schedule: Sequence[float] | None, attempts: int, error: DeliveryError, rand: Rand) -> float | None:
    """Seconds until the next attempt after `attempts` failed ones, or None to dead-letter."""
    if schedule is None:
        delay = max(full_jitter(attempts, FOREVER_BASE, FOREVER_CAP, rand), 0.1)
    elif attempts > len(schedule):
        return None
    else:
        delay = schedule[attempts - 1] * (0.8 + 0.4 * rand())
    if error.retry_after is not None:
        delay = max(delay, error.retry_after)
    return delay
