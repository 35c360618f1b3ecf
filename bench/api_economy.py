"""Benchmark 1, API economy: Batch API requests per full refresh of N active tracked batches.

For N = 100, 1,000 and 10,000 the simulator holds exactly N batches, all tracked and all active, so they
are the newest N in the list. batch-poller's automatic choice (the daemon's refresh of every due batch:
list pages or one retrieve each) is compared with one retrieve per batch (N requests) and with the floor, the list pages
that hold them: ceil(N/100). The first refresh (first sight: no `created_at` known yet) is reported apart
from steady-state refreshes (the median of three). A fourth case tracks 1,000 batches spread among the
newest 10,000, where the floor is the pages down to the oldest tracked one.

Requests are counted by the simulator (what the API received), in this process: only counts matter here.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, Section, devnull_logging, fmt, median, poller_config, quick, ratio, workdir
from bench.driver import DaemonDriver, Refresh, pre_track
from bench.simproc import steady_sim
from poller.sim import OpenAISim, serve

SIZES = (100, 1_000, 10_000)
REPS = 3
#: `--quick`: the smallest size, and the spread case scaled down as much (100 among the newest 1,000).
QUICK_SIZES = (100,)
PAGE = 100


@dataclass(frozen=True)
class Case:
    label: str
    total: int  # batches in the simulator
    every: int  # track every `every`-th batch, newest first


@dataclass(frozen=True)
class Outcome:
    case: Case
    tracked: int
    floor: int
    first: Refresh
    first_seen: dict[str, int]
    steady: list[Refresh]
    steady_seen: list[dict[str, int]]

    @property
    def steady_requests(self) -> float:
        return median([sum(s.values()) for s in self.steady_seen])


def _seen(sim: OpenAISim) -> dict[str, int]:
    return {k: v for k, v in sim.stats.as_dict().items() if k in ("list", "retrieve") and v}


async def _measure(case: Case, reps: int) -> Outcome:
    sim, created = steady_sim(case.total)
    newest_first = [record.id for record in sim.book.newest_first()]
    tracked = newest_first[:: case.every]
    oldest_rank = max(newest_first.index(i) for i in tracked) + 1
    floor = math.ceil(oldest_rank / PAGE)
    assert len(created) == case.total
    with workdir("api") as tmp:
        async with serve(sim) as url:
            state = tmp / "state.db"
            await pre_track(state, tracked)
            async with DaemonDriver(_config(url, state)) as driver:
                first = await driver.first_refresh()
                first_seen = _seen(sim)
                steady, steady_seen = [], []
                for _ in range(reps):
                    sim.stats.reset()
                    steady.append(await driver.full_refresh())
                    steady_seen.append(_seen(sim))
    return Outcome(case, len(tracked), floor, first, first_seen, steady, steady_seen)


def _config(url: str, state: Path) -> dict[str, Any]:
    """Long intervals: nothing becomes due by itself while the refreshes are measured."""
    hour = "1h"
    return poller_config(
        url,
        state,
        log_level="warning",
        validating=hour,
        in_progress=hour,
        finalizing=hour,
        cancelling=hour,
        max_interval=hour,
    )


def _split(seen: dict[str, int]) -> str:
    return " + ".join(f"{v:,} {k}" for k, v in sorted(seen.items())) or "0"


async def _run(small: bool) -> Section:
    devnull_logging("warning")
    section = Section("API economy")
    sizes, reps = (QUICK_SIZES, 1) if small else (SIZES, REPS)
    spread = sizes[-1]
    cases = [Case(f"N = {n:,}", n, 1) for n in sizes]
    cases.append(Case(f"{spread // 10:,} among newest {spread:,}", spread, 10))
    for case in cases:
        started = time.perf_counter()
        out = await _measure(case, reps)
        n, auto = out.tracked, out.steady_requests
        within = auto <= 1.1 * out.floor
        main = case.every == 1
        section.rows.append(
            Row(
                f"Requests per steady refresh, {case.label}",
                f"{fmt(auto, 0)}",
                f"{n:,} (retrieve each); floor {out.floor:,}",
                f"{ratio(auto, out.floor)}x floor; {ratio(auto, n, 3)}x retrieve",
                "≤ 1.1x floor" if main else "(informational)",
                within if main else None,
            )
        )
        first_total = sum(out.first_seen.values())
        section.rows.append(
            Row(
                f"Requests on first sight, {case.label}",
                f"{first_total:,}",
                f"{n:,} (retrieve each); floor {out.floor:,}",
                f"{ratio(first_total, out.floor)}x floor",
                "(informational)",
            )
        )
        steady_wall = median([s.wall for s in out.steady])
        section.notes.append(
            f"{case.label}: first sight {_split(out.first_seen)} in {out.first.wall:.2f} s; steady refreshes "
            f"{', '.join(_split(s) for s in out.steady_seen)} (median wall {steady_wall:.2f} s, in-process "
            f"simulator); batches left due after a refresh: {max(s.missed for s in out.steady)}; "
            f"measured in {time.perf_counter() - started:.0f} s."
        )
    return section


def run(ctx: dict[str, Any]) -> Section:
    return asyncio.run(_run(quick(ctx)))
