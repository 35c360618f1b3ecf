"""Benchmark 1, API economy: Batch API requests per full refresh of N active tracked batches.

For N = 100, 1,000 and 10,000 the simulator holds exactly N batches, all tracked and all active, so they
are the newest N in the list. batch-poller's automatic choice (the daemon's refresh of every due batch:
list pages or one retrieve each) is compared with one retrieve per batch (N requests) and with the floor, the list pages
that hold them: ceil(N/100). The first refresh (first sight: no `created_at` known yet) is reported apart
from steady-state refreshes (the median of three). A fourth case tracks 1,000 batches spread among the
newest 10,000, where the floor is the pages down to the oldest tracked one.

Steady state on the daemon's own schedule (no forced refresh): for N = 1,000, 10,000 and 100,000 the
daemon runs with a `[poll] latency` and request rate chosen so that its derived walk period is 2 s,
30 s and 30 s; after first sight and two walks to settle, four walks are measured: the requests the
simulator received per walk (target ≤ 1.1 x ceil(N/100)) and each period between two refreshes of
the oldest batch (its last page), worst against the walk period (target ≤ 1.1 x).

Forced refreshes: requests are counted by the simulator (what the API received), in this process (only
counts matter there). Steady state: the simulator runs in a process of its own (`bench.simproc`), as the
oldest batch's period is a matter of time, and requests are counted as the daemon sent them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    QUIET,
    Row,
    Section,
    devnull_logging,
    fmt,
    median,
    poller_config,
    quick,
    ratio,
    sim_process,
    until,
    workdir,
)
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


#: Steady state on the daemon's own schedule: (N, `[poll] latency`, requests per second). The walk
#: period the daemon derives (`schedule.walk_period`) is the interval the oldest batch is held to.
STEADY_CASES = ((1_000, 1.0, 10.0), (10_000, 10.0, 10.0), (100_000, 7.5, 100.0))
QUICK_STEADY_CASES = ((1_000, 1.0, 10.0),)
#: Walks measured after two to settle.
WALKS = 4


@dataclass(frozen=True)
class SteadyOutcome:
    n: int
    floor: int
    period: float
    walks: int
    requests: int
    oldest_periods: list[float]
    #: Each measured walk's own work (seconds, less what it waited on its page spacing).
    works: list[float]
    first_sight: float

    @property
    def per_walk(self) -> float:
        return self.requests / max(self.walks, 1)


async def _steady(n: int, latency: float, rate: float) -> SteadyOutcome:
    """A running daemon on its own schedule: requests per walk period and the oldest batch's period.

    The simulator runs in its own process (at N = 100,000 it would otherwise take a core's worth of the
    daemon's event loop), so requests are counted as the daemon sent them (`Provider.requests`).
    """
    with workdir("api-steady") as tmp, sim_process(n, tmp) as sim:
        state = tmp / "state.db"
        await pre_track(state, sim.ids)
        raw = poller_config(
            sim.url,
            state,
            log_level="warning",
            latency=f"{latency}s",
            **QUIET,
            max_requests_per_second=rate,
        )
        started = time.perf_counter()
        async with DaemonDriver(raw) as driver:
            await driver.first_refresh()
            tracker = driver.runner.tracker
            await until(lambda: all(b.created_at is not None for b in tracker.active()))
            first_sight = time.perf_counter() - started
            # The oldest batch is on the walk's last page.
            oldest = min(tracker.active(), key=lambda b: (b.created_at or 0, b.id)).id
            walks: list[float] = []
            works: list[float] = []  # each walk's own work, less the time it waited on its spacing
            seen_oldest: list[float] = []
            learn, observe, unchanged = tracker.learn_walk, tracker.observe, tracker.seen_unchanged

            def learned(marks: list[int], items: int, tracked_seen: int, work: float) -> None:
                walks.append(time.perf_counter())
                works.append(work)
                learn(marks, items, tracked_seen, work)

            def observed(snap: Any, *args: Any, **kwargs: Any) -> Any:  # whatever `observe` takes
                if snap.id == oldest:
                    seen_oldest.append(time.perf_counter())
                return observe(snap, *args, **kwargs)

            def vouched(batch_id: str, now: float) -> None:  # a list item equal to the body last seen
                if batch_id == oldest:
                    seen_oldest.append(time.perf_counter())
                unchanged(batch_id, now)

            tracker.learn_walk = learned  # type: ignore[method-assign]
            tracker.observe = observed  # type: ignore[method-assign]
            tracker.seen_unchanged = vouched  # type: ignore[method-assign]
            await until(lambda: len(walks) >= 2)
            before = sum(driver.requests().values())
            mark, oldest_mark = len(walks), len(seen_oldest)
            await until(lambda: len(walks) >= mark + WALKS)
            requests = sum(driver.requests().values()) - before
            period = tracker.period
    times = seen_oldest[max(oldest_mark - 1, 0) :]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return SteadyOutcome(n, math.ceil(n / PAGE), period, WALKS, requests, gaps, works[mark:], first_sight)


def _config(url: str, state: Path) -> dict[str, Any]:
    """Long intervals: nothing becomes due by itself while the refreshes are measured."""
    return poller_config(
        url,
        state,
        log_level="warning",
        **QUIET,
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
    for n, latency, rate in QUICK_STEADY_CASES if small else STEADY_CASES:
        started = time.perf_counter()
        steady = await _steady(n, latency, rate)
        per_walk = steady.per_walk
        section.rows.append(
            Row(
                f"Requests per walk period on the daemon's own schedule, N = {n:,}",
                f"{fmt(per_walk, 1)}",
                f"floor {steady.floor:,}",
                f"{ratio(per_walk, steady.floor)}x floor",
                "≤ 1.1x floor",
                per_walk <= 1.1 * steady.floor,
            )
        )
        worst = max(steady.oldest_periods, default=math.inf)
        section.rows.append(
            Row(
                f"Refresh period of the oldest batch, N = {n:,}",
                f"{fmt(median(steady.oldest_periods))} s (worst {fmt(worst)} s)",
                f"interval {fmt(steady.period)} s",
                f"{ratio(worst, steady.period)}x interval",
                "≤ 1.1x interval",
                worst <= 1.1 * steady.period,
            )
        )
        section.notes.append(
            f"Steady state, N = {n:,}: latency {latency:g} s at {rate:g} requests/s gives a walk period of "
            f"{fmt(steady.period)} s; {steady.requests:,} requests over {steady.walks} walks (after two to "
            f"settle); the oldest batch's periods {', '.join(fmt(g) for g in steady.oldest_periods)} s; "
            f"each walk's own work (less what it waited on its page spacing) "
            f"{', '.join(fmt(w) for w in steady.works)} s; "
            f"first sight {steady.first_sight:.1f} s; measured in {time.perf_counter() - started:.0f} s."
        )
    return section


def run(ctx: dict[str, Any]) -> Section:
    return asyncio.run(_run(quick(ctx)))
