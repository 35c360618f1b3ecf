"""Simulated provider Batch APIs for the demo, the tests and the benchmarks.

Each provider's simulator is wire-compatible with that provider's official SDK; all share one clock,
one seeded lifecycle, fault injection and request counters (`poller.sim.base`).
"""

from poller.sim.base import DEFAULT_KEY, SimApi, SimRequestError, serve
from poller.sim.clock import Clock, ManualClock, SimClock
from poller.sim.faults import Fault, SimStats
from poller.sim.lifecycle import SimProfile
from poller.sim.openai import OpenAISim

__all__ = [
    "DEFAULT_KEY",
    "Clock",
    "Fault",
    "ManualClock",
    "OpenAISim",
    "SimApi",
    "SimClock",
    "SimProfile",
    "SimRequestError",
    "SimStats",
    "serve",
]
