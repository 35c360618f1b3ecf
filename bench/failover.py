"""Benchmark 7, replicas: the API requests of three replicas against one, and failover time.

Real processes: `batch-poller run` replicas on one PostgreSQL database (a private cluster this benchmark
starts with initdb and pg_ctl, as the tests do), four sources, each an OpenAI simulator (served in this
process: its CPU is not measured) with 100 batches steady in progress, `[poll] latency = "1s"` so a
window holds enough requests to compare, `[state] lease_ttl` at its default (30 s).

Requests: every list and retrieve the four simulators received over a 20 s window, first with one
replica polling all four sources, then with three sharing them (after the shares settled). The target:
three replicas send no more than one (ratio ≤ 1.05).

Failover: the replica polling the most sources is SIGKILLed (and a replacement started, as systemd's
Restart= would); the figure is from the kill to the last of its sources being polled again by another
replica, from the replicas' own `polling source` log lines; median of three kills (max in the notes).
Target: within one lease_ttl plus 3 s. Hand-over: the same with SIGTERM (a clean stop releases its
leases), median of three.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import KEY_ENV, PYTHON, ROOT, Row, Section, child_env, fmt, median, quick, until, workdir
from bench.simproc import steady_sim
from poller.sim import OpenAISim, serve
from tests.helpers import write_toml
from tests.postgres import PASSWORD, Cluster, create_database, private_cluster
from tests.replica_logs import Span, polling_now, spans, taken_over

SOURCES = 4
BATCHES = 100
TTL = 30.0
WINDOW = 20.0
KILLS = 3
PASSWORD_ENV = "BENCH_PG_PASSWORD"


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    log: Path
    ended: float | None = None

    @property
    def name(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}"


class Fleet:
    """The replicas started so far (live and ended), all with one config file."""

    def __init__(self, config: Path, tmp: Path) -> None:
        self.config = config
        self.tmp = tmp
        self.replicas: list[Replica] = []

    def start(self) -> Replica:
        log = self.tmp / f"replica-{len(self.replicas)}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [PYTHON, "-m", "poller.cli", "run", "--config", str(self.config)],
                cwd=ROOT,
                env=child_env({PASSWORD_ENV: PASSWORD}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        rep = Replica(proc, log)
        self.replicas.append(rep)
        return rep

    def end(self, rep: Replica, sig: int) -> float:
        rep.proc.send_signal(sig)
        at = time.time()
        rep.proc.wait(60)
        rep.ended = at if sig == signal.SIGKILL else time.time()
        return at

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.ended is None]

    def spans(self) -> list[Span]:
        now = time.time() + 1
        return [s for r in self.replicas for s in spans(r.log, r.name, r.ended or now)]

    def polling(self) -> dict[str, set[str]]:
        return polling_now(self.spans(), time.time())

    def covered(self, sources: list[str], replicas: int) -> bool:
        """Every source polled by exactly one replica, and `replicas` of them polling."""
        now = self.polling()
        return all(len(now.get(s, ())) == 1 for s in sources) and len(set().union(*now.values())) == replicas

    def close(self) -> None:
        for rep in self.live():
            self.end(rep, signal.SIGTERM)


def config(
    cluster: Cluster, database: str, urls: dict[str, str], ids: dict[str, list[str]], ttl: float
) -> dict[str, Any]:
    return {
        "sources": [
            {"name": s, "base_url": u, "api_key_env": KEY_ENV, "discover": False, "track": ids[s]}
            for s, u in urls.items()
        ],
        "poll": {"latency": "1s", "max_requests_per_second": 100},
        "state": {"url": cluster.url(database), "password_env": PASSWORD_ENV, "lease_ttl": f"{ttl:g}s"},
        "log": {"format": "json", "level": "info"},
        "service": {"enabled": False},
    }


@contextlib.asynccontextmanager
async def simulators(count: int, batches: int) -> AsyncIterator[dict[str, tuple[OpenAISim, str, list[str]]]]:
    async with contextlib.AsyncExitStack() as stack:
        out = {}
        for i in range(count):
            sim, ids = steady_sim(batches, seed=200 + i)
            out[f"s{i}"] = (sim, await stack.enter_async_context(serve(sim)), ids)
        yield out


def requests(sims: dict[str, tuple[OpenAISim, str, list[str]]]) -> int:
    return sum(sim.stats.list + sim.stats.retrieve for sim, _, _ in sims.values())


async def _window(sims: dict[str, tuple[OpenAISim, str, list[str]]], seconds: float) -> int:
    before = requests(sims)
    await asyncio.sleep(seconds)  # the measurement window
    return requests(sims) - before


async def _failover(fleet: Fleet, sources: list[str], sig: int, ttl: float) -> float:
    """End the replica polling the most sources with `sig`; seconds until all of them are polled again."""
    now = fleet.polling()
    victim = max(fleet.live(), key=lambda r: sum(1 for names in now.values() if r.name in names))
    held = [s for s, names in now.items() if victim.name in names]
    ended = await asyncio.to_thread(fleet.end, victim, sig)
    fleet.start()

    def taken() -> bool:
        got = fleet.spans()
        return all(taken_over(got, s, ended, victim.name) is not None for s in held)

    if not await until(taken, within=ttl + 60, every=0.1):
        raise RuntimeError(f"{held} were not taken over within {ttl + 60:g}s")
    got = fleet.spans()
    seconds = max((taken_over(got, s, ended, victim.name) or ended) - ended for s in held)
    await until(lambda: fleet.covered(sources, 3), within=ttl + 60, every=0.2)  # settled for the next one
    return seconds


async def _measure(
    cluster: Cluster, database: str, tmp: Path, batches: int, ttl: float, window: float, kills: int
) -> dict[str, Any]:
    async with simulators(SOURCES, batches) as sims:
        urls = {name: url for name, (_, url, _) in sims.items()}
        ids = {name: batch_ids for name, (_, _, batch_ids) in sims.items()}
        sources = list(urls)
        fleet = Fleet(write_toml(tmp / "config.toml", config(cluster, database, urls, ids, ttl)), tmp)
        try:
            fleet.start()
            if not await until(lambda: fleet.covered(sources, 1), within=60, every=0.2):
                raise RuntimeError("one replica did not take every source")
            await asyncio.sleep(3.0)  # first sight of every batch, before the window
            one = await _window(sims, window)
            fleet.start()
            fleet.start()
            if not await until(lambda: fleet.covered(sources, 3), within=ttl + 60, every=0.2):
                raise RuntimeError("three replicas did not share the sources")
            await asyncio.sleep(2.0)
            three = await _window(sims, window)
            killed = [await _failover(fleet, sources, signal.SIGKILL, ttl) for _ in range(kills)]
            stopped = [await _failover(fleet, sources, signal.SIGTERM, ttl) for _ in range(kills)]
        finally:
            await asyncio.to_thread(fleet.close)
    return {"one": one, "three": three, "killed": killed, "stopped": stopped}


def run(ctx: dict[str, Any]) -> Section:
    section = Section("Replicas")
    short = quick(ctx)
    batches, ttl, window, kills = (10, 3.0, 3.0, 1) if short else (BATCHES, TTL, WINDOW, KILLS)
    with workdir("failover") as tmp, private_cluster() as cluster:
        database = create_database(cluster)
        got = asyncio.run(_measure(cluster, database, tmp, batches, ttl, window, kills))
    one, three = got["one"], got["three"]
    ratio = three / one if one else float("nan")
    section.rows.append(
        Row(
            f"API requests in {window:g} s, 3 replicas vs 1 ({SOURCES} sources, latency 1 s)",
            f"{three}",
            f"{one} (one replica)",
            fmt(ratio),
            "≤ 1.05",
            ratio <= 1.05,
        )
    )
    killed, stopped = got["killed"], got["stopped"]
    section.rows.append(
        Row(
            f"failover after SIGKILL (lease_ttl {ttl:g} s), median of {len(killed)}",
            f"{median(killed):.1f} s",
            "—",
            "—",
            f"≤ {ttl + 3:g} s",
            max(killed) <= ttl + 3,
        )
    )
    section.rows.append(
        Row(
            f"hand-over on SIGTERM (clean stop), median of {len(stopped)}",
            f"{median(stopped):.1f} s",
            "—",
            "—",
            "≤ 3 s",
            max(stopped) <= 3,
        )
    )
    section.notes.append(
        f"Replicas: {SOURCES} sources x {batches} batches steady in progress, `batch-poller run` processes on a"
        f" private PostgreSQL cluster; requests are the simulators' list + retrieve counts over {window:g} s."
        f" Failover after SIGKILL: {', '.join(f'{s:.1f}' for s in killed)} s (max {max(killed):.1f} s; the lease"
        f" runs out one lease_ttl after its last renewal, which came up to a third of it before the kill)."
        f" Hand-over on SIGTERM: {', '.join(f'{s:.2f}' for s in stopped)} s."
    )
    return section
