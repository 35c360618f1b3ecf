"""Pure scheduling: poll intervals, error backoff with full jitter, Retry-After, and the global pacer.

Nothing here reads a clock or a random source of its own: callers pass `now` and `rand`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

Rand = Callable[[], float]
"""A source of uniform floats in [0, 1); `random.random` in production, a seeded one in tests."""


@dataclass(frozen=True, slots=True)
class Intervals:
    """Base poll interval per status, growth while nothing changes, and the cap."""

    base: Mapping[str, float]
    growth: float = 1.5
    max_interval: float = 300.0
    default: float = 30.0

    def next(self, status: str, previous: float | None, *, changed: bool) -> float:
        """The next poll interval: the status's base after a change, else the previous one grown, capped."""
        base = min(self.base.get(status, self.default), self.max_interval)
        if changed or previous is None:
            return base
        return min(max(previous * self.growth, base), self.max_interval)


#: The share of the request budget a list walk may plan on; discovery, retrieves and retries use the rest.
WALK_SHARE = 0.8


def walk_period(latency: float, pages: int, rate: float, *, cap: float) -> float:
    """Seconds from the start of one walk of the `pages` list pages holding active batches to the next.

    One page is walked every `latency` seconds; each tenfold more pages adds one `latency` (so 10 pages
    cost 2 x latency, 100 pages 3 x latency): detection latency grows slowly while requests per hour
    grow less than linearly with the fleet. `cap` (the longest poll interval) is an upper bound; a walk
    never plans on more than WALK_SHARE of `rate` (requests per second), whatever the latency asks.
    """
    pages = max(pages, 1)
    wanted = min(latency * (1.0 + math.log10(pages)), cap)
    return max(wanted, pages / (rate * WALK_SHARE))


#: The most of a walk period a paced walk spreads its pages over (the rest is slack for a slow walk).
WALK_SPREAD = 0.8
#: A paced walk's pages are this much further apart than the slowest recent page's own work.
WALK_STRETCH = 1.25


def page_spacing(period: float, pages: int, page_work: Iterable[float]) -> float:
    """Seconds from one list page request of a walk to the next: a little more than the slowest of the
    recent walks' `page_work` (seconds per page, waiting only on the API), so that the `pages` of a walk
    never spread over more than WALK_SPREAD of the `period`. 0 before any walk is known.

    A page's period is the walk period plus the change in when the walk reads it. Unpaced, a walk that
    records many events (or meets a slow API) reads its last pages seconds later than a light one did,
    so those batches wait that much longer; paced alike, every walk reads page k at about the same point
    and each batch's period stays near the walk period.
    """
    slowest = max(page_work, default=0.0)
    return min(WALK_SPREAD * period / max(pages, 1), WALK_STRETCH * slowest)


def retrieve_delay(
    base: float, *, floor: float, eta: float | None = None, expires_in: float | None = None, cap: float = math.inf
) -> float:
    """Delay to the next retrieve of a batch no list page refreshes, spending requests where they matter.

    `base` is the per-status interval (grown while nothing changes). With an estimated completion `eta`
    (seconds from now), a batch is polled right when it should finish and every `floor` seconds (the
    latency target) once that is near; far from it, at half the distance left, up to `cap`. A batch that
    expires within the delay is polled just after `expires_in` (and for a while after, every `floor`).
    """
    delay = base
    if eta is not None:
        delay = max(floor, eta) if eta <= base else min(max(base, eta / 2.0), max(cap, base))
    if expires_in is not None and expires_in > -10.0 * floor:
        delay = min(delay, max(floor, expires_in + 1.0))
    return delay


def full_jitter(streak: int, base: float, cap: float, rand: Rand) -> float:
    """AWS-style full jitter: uniform in [0, min(cap, base * 2**(streak-1))] for the streak-th error."""
    ceiling = min(cap, base * 2.0 ** max(streak - 1, 0))
    return rand() * ceiling


def error_delay(streak: int, base: float, cap: float, rand: Rand, retry_after: float | None) -> float:
    """Delay after an error; a server's Retry-After is a floor that is never undercut."""
    delay = full_jitter(streak, base, cap, rand)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from `retry-after-ms` (preferred, as OpenAI sends it) or `Retry-After`.

    `Retry-After` may be delta-seconds or an HTTP date; `now` is the wall-clock epoch for the latter.
    Returns None when neither header is present or parseable.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        return max(when.timestamp() - now, 0.0)
    return value if math.isfinite(value) and value >= 0 else None


#: 429s closer together than this (and any during a Retry-After pause) halve the rate only once.
PENALTY_WINDOW = 1.0


class Pacer:
    """Global request pacing: a token bucket whose rate halves on 429 and recovers while calls succeed.

    Pure: every method takes `now` (a monotonic clock reading). `reserve` returns how long to wait
    before sending; the caller sleeps that long. A 429's Retry-After pauses every request until it ends.
    """

    def __init__(self, rate: float, *, min_rate: float = 0.2, recovery: float = 30.0) -> None:
        self.max_rate = rate
        self.rate = rate
        self.min_rate = min(min_rate, rate)
        self.recovery = recovery
        self._next_free = -math.inf
        self._paused_until = -math.inf
        self._last_penalty = -math.inf

    def configure(self, rate: float) -> None:
        """A new configured maximum (on reload), keeping any pause and penalty in force."""
        self.max_rate = rate
        self.rate = min(self.rate, rate)
        self.min_rate = min(self.min_rate, rate)

    def reserve(self, now: float) -> float:
        """Book the next request slot; returns the wait before it may be sent."""
        start = max(now, self._next_free, self._paused_until)
        self._next_free = start + 1.0 / self.rate
        return start - now

    def penalize(self, now: float, retry_after: float | None) -> None:
        """A 429: halve the rate and pause everything until the server's Retry-After has passed.

        Requests already in flight when the first 429 arrives get 429s too; those extend the pause but
        do not halve the rate again.
        """
        # A burst of 429s from requests that were in flight together is one signal, not several.
        if now >= self._paused_until and now - self._last_penalty >= PENALTY_WINDOW:
            self.rate = max(self.min_rate, self.rate / 2.0)
        self._last_penalty = now
        if retry_after is not None:
            self._paused_until = max(self._paused_until, now + retry_after)

    def reward(self, now: float) -> None:
        """A success: after `recovery` seconds without a 429, step the rate back up towards the maximum."""
        if self.rate < self.max_rate and now - self._last_penalty >= self.recovery:
            self.rate = min(self.max_rate, self.rate * 1.5)
            self._last_penalty = now

    @property
    def paused_until(self) -> float:
        return self._paused_until
