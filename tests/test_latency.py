"""The latency target on a running daemon: one walk of the active pages per period, changes seen within one.

Counted through the simulator's request counters and the tracker's record of each walk, never timed.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

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

    def learned(marks: list[int], items: int, tracked_seen: int, work: float) -> None:
        walks.append(len(marks))
        learn(marks, items, tracked_seen, work)

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


async def test_a_walk_spaces_its_pages_by_the_slowest_recent_walk_and_counts_only_its_own_work(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        raw = config_dict(url, tmp_path / "state.db", [], latency="0.2s", max_interval="1h")
        raw["source"]["track"] = sim.create_batches(BATCHES)
        async with running(make_config(raw)) as daemon:
            runner = daemon.runner(None)
            tracker, provider = runner.tracker, runner.ctx.provider
            assert provider is not None
            await eventually(lambda: all(b.created_at for b in tracker.active()), timeout=30)
            requested: list[float] = []
            finished: list[tuple[float, float]] = []  # (when, the walk's own work per page)
            list_page, learn = provider.list_page, tracker.learn_walk

            async def timed(cursor: str | None) -> Any:
                requested.append(time.monotonic())
                return await list_page(cursor)

            def learned(marks: list[int], items: int, tracked_seen: int, work: float) -> None:
                finished.append((time.monotonic(), work))
                learn(marks, items, tracked_seen, work)

            provider.list_page = timed  # type: ignore[method-assign]
            tracker.learn_walk = learned  # type: ignore[method-assign]
            await eventually(lambda: len(finished) >= 1)  # past the walk under way
            tracker.page_work.append(60.0)  # as if a walk had just taken a minute per page
            begun = len(requested)
            await eventually(lambda: len(finished) >= 2)
            spacing = tracker.page_spacing()
            walk = requested[begun : begun + PAGES]
            ended, work = finished[1]
    # Spread over 80 % of the period: capped, whatever the recent work.
    assert spacing == pytest.approx(0.8 * tracker.period / tracker.walk_pages)
    # Page k is requested no sooner than k spacings after the first (a sleep never ends early by more
    # than the clock's resolution; a late page makes no later one early) ...
    assert all(at - walk[0] >= 0.9 * k * spacing for k, at in enumerate(walk)), walk
    # ... and the time spent only waiting on that spacing is not counted as the walk's own work.
    assert work * PAGES < ended - walk[0]
