"""Estimated completion of a batch from its request counts over time: pure, the caller passes `now`.

A batch's throughput is rarely steady (providers ramp up, pause, and work in bursts), so the estimate
uses a window of recent samples rather than the whole history, and says nothing until it has seen some
progress over a meaningful span: a wrong estimate would be worse than none.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field

#: Samples older than this (seconds) fall out of the window: the rate follows the recent pace.
WINDOW = 1800.0
#: At most this many samples are kept per batch.
MAX_SAMPLES = 32
#: No estimate before the window spans this long (seconds) with some progress in it.
MIN_SPAN = 30.0


@dataclass(slots=True)
class ProgressWindow:
    """Recent (time, finished requests) samples of one batch, and the total it must reach."""

    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    total: int = 0

    def add(self, now: float, finished: int, total: int) -> None:
        """Record that `finished` of `total` requests were done at `now` (repeat counts are kept once)."""
        if self.samples and finished < self.samples[-1][1]:
            self.samples.clear()  # counts went backwards (a provider reset): start over
        if len(self.samples) > 1 and self.samples[-1][1] == self.samples[-2][1] == finished:
            self.samples.pop()  # keep a plateau's first and latest sample: the rate includes the pause
        self.samples.append((now, finished))
        self.total = total
        while len(self.samples) > 2 and now - self.samples[0][0] > WINDOW:
            self.samples.popleft()

    def rate(self) -> float | None:
        """Finished requests per second over the window, or None while that says nothing yet."""
        if len(self.samples) < 2:
            return None
        (t0, f0), (t1, f1) = self.samples[0], self.samples[-1]
        span = t1 - t0
        if span < MIN_SPAN or f1 <= f0:
            return None
        return (f1 - f0) / span

    def eta(self, now: float) -> float | None:
        """Seconds from `now` until every request is finished at the recent pace; None when unknown."""
        rate = self.rate()
        if rate is None:
            return None
        t1, f1 = self.samples[-1]
        left = max(self.total - f1, 0)
        return max(left / rate - (now - t1), 0.0)


#: At most this many (time, finished) anchors are kept in a batch's stored knowledge.
MAX_ANCHORS = 8

Anchors = tuple[tuple[float, int], ...]


def _window(anchors: Anchors, total: int) -> ProgressWindow:
    window = ProgressWindow(deque(maxlen=MAX_ANCHORS))
    window.samples.extend(anchors)
    window.total = total
    return window


def advance(anchors: Anchors, now: float, finished: int) -> Anchors:
    """The anchors after seeing `finished` requests done at `now`, by the window's rules (at most
    `MAX_ANCHORS`, the recent `WINDOW`, a reset when counts go backwards). Kept only when counts move, so
    the stored knowledge changes no more often than the batch body does.
    """
    if anchors and anchors[-1][1] == finished:
        return anchors
    window = _window(anchors, 0)
    window.add(_at(now), finished, 0)
    return tuple(window.samples)


@functools.lru_cache(maxsize=1)
def _at(now: float) -> float:
    """`now` to the millisecond, one float object for every batch of one list page (they share `now`):
    a float each is 24 bytes times the anchors of every tracked batch."""
    return round(now, 3)


def completion(anchors: Anchors, total: int, now: float) -> int | None:
    """When (Unix seconds) all `total` requests should be done at the pace the anchors show; None when
    unknown, or when nothing moved for a whole `WINDOW`.

    Counts unchanged since the last anchor may just not have been polled yet, so the estimate holds
    still; once it has passed, the pause counts as part of the pace and the estimate moves later.
    """
    if not anchors or total <= 0:
        return None
    last_at, last_finished = anchors[-1]
    if now - last_at > WINDOW:
        return None
    window = _window(anchors, total)
    left = window.eta(last_at)
    if left is None:
        return None
    if last_at + left < now:
        window.add(now, last_finished, total)
        left = window.eta(now)
        return None if left is None else math.ceil(now + left)
    return math.ceil(last_at + left)
