"""The latency target on a running daemon: one walk of the active pages per period, changes seen within one.

Counted through the simulator's request counters and the tracker's record of each walk, never timed.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from poller.polling.tracker import Tracker
from poller.sim import OpenAISim, serve
from tests.helpers import config_dict, eventually, fast_sim, make_config, running

BATCHES = 250  # three list pages
PAGES = math.ceil(BATCHES / 100)


@asynccontextmanager
async def steady(tmp_path: Path) -> AsyncIterator[tuple[OpenAISim, list[str], Tracker, list[int]]]:
    """A daemon tracking BATCHES frozen batches (validating for an hour at this speed), every one placed
    on its list page; yields the simulator, the ids, the tracker and the pages of each walk from then on."""
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        ids = sim.create_batches(BATCHES)
        raw = config_dict(url, tmp_path / "state.db", [], latency="0.2s", max_interval="1h")
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            tracker = daemon.runner(None).tracker
            await eventually(lambda: all(b.created_at for b in tracker.active()), timeout=30)
            yield sim, ids, tracker, record_walks(tracker)


def record_walks(tracker: Tracker) -> list[int]:
    """Pages read by each walk from now on (the walk reports its page marks when it ends)."""
    walks: list[int] = []
    learn = tracker.learn_walk

    def learned(marks: list[int], items: int, tracked_seen: int) -> None:
        walks.append(len(marks))
        learn(marks, items, tracked_seen)

    tracker.learn_walk = learned  # type: ignore[method-assign]
    return walks


async def test_steady_state_walks_every_active_page_once_per_period_and_nothing_else(tmp_path):
    async with steady(tmp_path) as (sim, _, _, walks):
        await eventually(lambda: len(walks) >= 2)  # past any walk that was under way
        sim.stats.reset()
        start = len(walks)
        await eventually(lambda: len(walks) >= start + 10, timeout=60)
        counted = walks[start : start + 10]
        requests = sim.stats.as_dict()
    assert counted == [PAGES] * 10  # the floor, ceil(N/100), every period: no staggered partial walks
    assert requests.get("retrieve", 0) == 0, requests
    assert requests.get("list", 0) <= 1.1 * PAGES * (len(walks) - start + 1), requests


async def test_a_status_change_is_detected_by_the_next_walk(tmp_path):
    async with steady(tmp_path) as (sim, ids, tracker, walks):
        await eventually(lambda: len(walks) >= 1)
        target = ids[len(ids) // 2]
        sim.cancel(target)
        cancelled_during = len(walks)
        requests_before = sim.stats.list + sim.stats.retrieve
        await eventually(lambda: tracker.batches[target].knowledge.status != "validating", timeout=30)
        walks_taken = len(walks) - cancelled_during
        spent = sim.stats.list + sim.stats.retrieve - requests_before
    # Seen by the walk under way at the cancel or the next one: at most two walks' worth of requests.
    assert walks_taken <= 2, walks_taken
    assert spent <= 2 * PAGES, spent
