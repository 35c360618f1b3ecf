"""Clocks the simulators run on: a scaled wall clock for demos and a manual one for tests."""

from __future__ import annotations

import math
import time
from typing import Protocol


class Clock(Protocol):
    """Anything that tells the simulated time in epoch seconds."""

    def now(self) -> float: ...


class SimClock:
    """A wall clock that runs `speed` simulated seconds per real second, from `start` (default: now)."""

    def __init__(self, speed: float = 1.0, start: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self._speed = speed
        self._origin = time.time() if start is None else start
        self._mono = time.monotonic()

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        if value <= 0:
            raise ValueError("speed must be positive")
        self._origin, self._mono, self._speed = self.now(), time.monotonic(), value

    def now(self) -> float:
        return self._origin + (time.monotonic() - self._mono) * self._speed


class ManualClock:
    """A clock that moves only when told to, for tests."""

    def __init__(self, start: float | None = None) -> None:
        self._now = float(math.floor(time.time()) if start is None else start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward and return the new time."""
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError("a clock only moves forward by a finite amount")
        self._now += seconds
        return self._now
