"""Benchmark 3, memory: peak RSS of a real `batch-poller run` process tracking 10,000 batches.

The daemon runs as its own process (the `batch-poller` console script) with the default [poll] settings,
its HTTP service on and an MQTT sink to a private Mosquitto, against the simulator (another process): it
sees the 10,000 batches for the first time (100 list pages at the default 10 requests/s), enqueues and
delivers their events, and refreshes them again when their 30 s interval is up, for 60 s in all. The
figure is VmHWM from /proc/PID/status just before SIGTERM. The alternative is the peak RSS of the CPU
benchmark's SDK loop process, which keeps the latest `Batch` of each of the 10,000.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
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
RUN = 60.0
TIMEOUT = 180.0
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


def run(ctx: dict[str, Any]) -> Section:
    section = Section("Memory")
    batches, run_for = (QUICK_BATCHES, QUICK_RUN) if quick(ctx) else (BATCHES, RUN)
    with workdir("memory") as tmp, Mosquitto(tmp / "mosquitto") as broker, sim_process(batches, tmp) as sim:
        state = tmp / "state.db"
        pre_track_sync(state, sim.ids)
        raw = poller_config(
            sim.url,
            state,
            [{"kind": "mqtt", "name": "mqtt", "url": broker.url, "qos": 1}],
            service_port=free_port(),
            max_requests_per_second=10,
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
                if seen_at is not None and now >= run_for:
                    break
                if now > TIMEOUT:
                    raise RuntimeError(f"not all batches seen after {TIMEOUT:g}s: {_progress(state)}")
            peak = peak_rss_mb(proc.pid)
            final = rss_mb(proc.pid)
        finally:
            code = stop_process(proc)
        _, pending, delivered = _progress(state)
    ctx["poller_peak_rss_mb"] = peak
    sdk = float(ctx.get("sdk_maxrss_mb", float("nan")))
    section.rows.append(
        Row(
            f"Peak RSS, `batch-poller run` tracking {batches:,} batches",
            f"{peak:.0f} MB",
            f"{sdk:.0f} MB (SDK loop process, {batches:,} kept)" if sdk == sdk else "n/a",
            ratio(peak, sdk),
            f"≤ {TARGET_MB:.0f} MB",
            peak <= TARGET_MB,
        )
    )
    section.notes.append(
        f"All {batches:,} seen {seen_at:.1f} s after start; ran {samples[-1][0]:.0f} s; {delivered:,} MQTT "
        f"deliveries acknowledged and {pending:,} pending when stopped; RSS at the end {final:.0f} MB, highest "
        f"sampled {max(r for _, r in samples):.0f} MB; exit code after SIGTERM {code}."
    )
    return section
