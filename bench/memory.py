"""Benchmark 3, memory: peak RSS of a real `batch-poller run` process tracking 10,000 and 100,000 batches.

The daemon runs as its own process (the `batch-poller` console script) with the default [poll] settings,
its HTTP service on and an MQTT sink to a private Mosquitto, against the simulator (another process): it
sees the batches for the first time (100 list pages at the default 10 requests/s; for 100,000, 1,000
pages at 100/s), enqueues and delivers their events, and keeps walking them for 60 s past first sight.
The figure is VmHWM from /proc/PID/status just before SIGTERM. The same daemon tracking no batch is the
base; the growth per 1,000 tracked batches is (peak at 100,000 - base) / 100. The alternative of the
10,000 row is the peak RSS of the CPU benchmark's SDK loop process, which keeps the latest `Batch` of
each of the 10,000.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    ROOT,
    Mosquitto,
    Row,
    Section,
    child_env,
    free_port,
    log_tail,
    peak_rss_mb,
    poller_config,
    quick,
    ratio,
    rss_mb,
    sim_process,
    stop_process,
    workdir,
)
from bench.driver import pre_track_sync
from tests.helpers import write_toml  # one TOML writer for the tests and the benchmarks

BATCHES = 10_000
TARGET_MB = 150.0
#: The large fleet of issue 13, its target, and the growth per 1,000 tracked batches above the base.
LARGE = 100_000
LARGE_TARGET_MB = 160.0
PER_THOUSAND_MB = 1.0
#: Seconds each daemon runs past first sight (the 30 s interval comes round at least once).
RUN = 60.0
TIMEOUT = 300.0
#: `--quick`: batches, and seconds to run in all (past first sight, not to the second refresh).
QUICK_BATCHES, QUICK_RUN = 200, 5.0


def daemon_command(config: Path) -> list[str]:
    """`batch-poller run`: the console script next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "batch-poller"
    if script.exists():
        return [str(script), "run", "--config", str(config)]
    return [PYTHON, "-m", "poller.cli", "run", "--config", str(config)]


def _progress(db: Path) -> tuple[int, int, int]:
    """(batches seen, outbox rows pending, outbox rows delivered), read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        seen = conn.execute("SELECT COUNT(*) FROM batches WHERE status IS NOT NULL").fetchone()[0]
        rows = dict(conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
    finally:
        conn.close()
    return int(seen), int(rows.get("pending", 0)), int(rows.get("delivered", 0))


@dataclass(frozen=True)
class Measured:
    batches: int
    peak: float
    final: float
    highest: float
    seen_at: float
    ran: float
    pending: int
    delivered: int
    code: int


def _measure(batches: int, run_for: float, rate: float) -> Measured:
    """One `batch-poller run` tracking `batches` (0: the base), from start to `run_for` s past first sight."""
    with workdir("memory") as tmp, Mosquitto(tmp / "mosquitto") as broker, sim_process(max(batches, 1), tmp) as sim:
        state = tmp / "state.db"
        pre_track_sync(state, sim.ids[:batches])
        raw = poller_config(
            sim.url,
            state,
            [{"kind": "mqtt", "name": "mqtt", "url": broker.url, "qos": 1}],
            service_port=free_port(),
            max_requests_per_second=rate,
        )
        config = write_toml(tmp / "config.toml", raw)
        log = (tmp / "daemon.log").open("ab")
        started = time.monotonic()
        proc = subprocess.Popen(daemon_command(config), cwd=ROOT, env=child_env(), stdout=log, stderr=log)
        log.close()
        samples: list[tuple[float, float]] = []
        seen_at: float | None = None
        try:
            while True:
                time.sleep(0.5)
                if proc.poll() is not None:
                    raise RuntimeError(f"batch-poller exited with {proc.returncode}:\n{log_tail(tmp / 'daemon.log')}")
                now = time.monotonic() - started
                samples.append((now, rss_mb(proc.pid)))
                if seen_at is None and state.exists() and _progress(state)[0] >= batches:
                    seen_at = now
                if seen_at is not None and now >= seen_at + run_for:
                    break
                if now > TIMEOUT:
                    raise RuntimeError(f"not all batches seen after {TIMEOUT:g}s: {_progress(state)}")
            peak = peak_rss_mb(proc.pid)
            final = rss_mb(proc.pid)
        finally:
            code = stop_process(proc)
        _, pending, delivered = _progress(state)
    highest = max(r for _, r in samples)
    return Measured(batches, peak, final, highest, seen_at or 0.0, samples[-1][0], pending, delivered, code)


def run(ctx: dict[str, Any]) -> Section:
    section = Section("Memory")
    short = quick(ctx)
    run_for = QUICK_RUN if short else RUN
    sizes = (0, QUICK_BATCHES) if short else (0, BATCHES, LARGE)
    # The default 10 requests/s, but for the large fleet 100/s, so first sight takes 10 s, not 100 s.
    got = {n: _measure(n, run_for, 100.0 if n >= LARGE else 10.0) for n in sizes}
    base, middle = got[0], got[sizes[1]]
    ctx["poller_peak_rss_mb"] = middle.peak
    sdk = float(ctx.get("sdk_maxrss_mb", float("nan")))
    section.rows.append(
        Row(
            f"Peak RSS, `batch-poller run` tracking {middle.batches:,} batches",
            f"{middle.peak:.0f} MB",
            f"{sdk:.0f} MB (SDK loop process, {middle.batches:,} kept)" if sdk == sdk else "n/a",
            ratio(middle.peak, sdk),
            f"≤ {TARGET_MB:.0f} MB",
            middle.peak <= TARGET_MB,
        )
    )
    if LARGE in got:
        large = got[LARGE]
        per_thousand = (large.peak - base.peak) / (LARGE / 1000)
        section.rows.append(
            Row(
                f"Peak RSS, `batch-poller run` tracking {LARGE:,} batches",
                f"{large.peak:.0f} MB",
                f"{base.peak:.0f} MB (the same daemon tracking none)",
                ratio(large.peak, base.peak),
                f"≤ {LARGE_TARGET_MB:.0f} MB",
                large.peak <= LARGE_TARGET_MB,
            )
        )
        section.rows.append(
            Row(
                "Peak RSS per 1,000 tracked batches above the base",
                f"{per_thousand:.2f} MB",
                f"({large.peak:.0f} - {base.peak:.0f}) MB / {LARGE // 1000}",
                "—",
                f"≤ {PER_THOUSAND_MB:g} MB",
                per_thousand <= PER_THOUSAND_MB,
            )
        )
    for m in got.values():
        section.notes.append(
            f"{m.batches:,} tracked: all seen {m.seen_at:.1f} s after start; ran {m.ran:.0f} s; {m.delivered:,} MQTT "
            f"deliveries acknowledged and {m.pending:,} pending when stopped; peak {m.peak:.0f} MB, RSS at the end "
            f"{m.final:.0f} MB, highest sampled {m.highest:.0f} MB; exit code after SIGTERM {m.code}."
        )
    return section
