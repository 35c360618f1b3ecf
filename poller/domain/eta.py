"""Estimated completion of a batch from its request counts over time: pure, the caller passes `now`.

A batch's throughput is rarely steady (providers ramp up, pause, and work in bursts), so the estimate
uses a window of recent samples rather than the whole history, and says nothing until it has seen some
progress over a meaningful span: a wrong estimate would be worse than none.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Iterable
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

#: One anchor packed: its time (a double) and its finished requests (a signed 64-bit integer), 16 bytes.
_ANCHOR = struct.Struct("=dq")

#: A batch's anchors, oldest first, packed end to end in one bytes object: one small object per tracked
#: batch, where a tuple of (float, int) tuples held a tuple, a float and an int per anchor besides (at
#: 100,000 batches, some 10 MB more). `anchor_pairs` reads them, `pack_anchors` writes them.
Anchors = bytes


def pack_anchors(pairs: Iterable[tuple[float, int]]) -> Anchors:
    """(time, finished) pairs, oldest first, as `Anchors`."""
    return b"".join([_ANCHOR.pack(at, finished) for at, finished in pairs])


def anchor_pairs(anchors: Anchors) -> tuple[tuple[float, int], ...]:
    """The (time, finished) pairs of `anchors`, oldest first."""
    return tuple(_ANCHOR.iter_unpack(anchors))


def _last(anchors: Anchors) -> tuple[float, int]:
    at, finished = _ANCHOR.unpack_from(anchors, len(anchors) - _ANCHOR.size)
    return at, finished


def _window(anchors: Anchors, total: int) -> ProgressWindow:
    window = ProgressWindow(deque(maxlen=MAX_ANCHORS))
    window.samples.extend(_ANCHOR.iter_unpack(anchors))
    window.total = total
    return window


def advance(anchors: Anchors, now: float, finished: int) -> Anchors:
    """The anchors after seeing `finished` requests done at `now` (kept to the millisecond), by the
    window's rules (`ProgressWindow.add`: at most `MAX_ANCHORS`, the recent `WINDOW`, a reset when counts
    go backwards), on the packed bytes. Kept only when counts move, so the stored knowledge changes no
    more often than the batch body does.
    """
    size = _ANCHOR.size
    if anchors:
        last = _last(anchors)[1]
        if last == finished:
            return anchors
        if finished < last:
            anchors = b""  # counts went backwards (a provider reset): start over
    at = round(now, 3)
    anchors = (anchors + _ANCHOR.pack(at, finished))[-MAX_ANCHORS * size :]
    while len(anchors) > 2 * size and at - _ANCHOR.unpack_from(anchors)[0] > WINDOW:
        anchors = anchors[size:]
    return anchors


def completion(anchors: Anchors, total: int, now: float) -> int | None:
    """When (Unix seconds) all `total` requests should be done at the pace the anchors show; None when
    unknown, or when nothing moved for a whole `WINDOW`.

    Counts unchanged since the last anchor may just not have been polled yet, so the estimate holds
    still; once it has passed, the pause counts as part of the pace and the estimate moves later.
    """
    if not anchors or total <= 0:
        return None
    last_at, last_finished = _last(anchors)
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
