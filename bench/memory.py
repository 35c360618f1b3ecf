"""Benchmark 3, memory: peak RSS of a real `batch-poller run` process tracking 10,000 batches.

The daemon runs as its own process (the `batch-poller` console script) against the simulator (another
process) with its HTTP service on and an MQTT sink to a private Mosquitto: it sees the 10,000 batches for
the first time, delivers the 10,000 events of first sight, and keeps refreshing them (5 to 10 s intervals)
for at least 30 s. The figure is VmHWM from /proc/PID/status just before SIGTERM. The alternative is the
peak RSS of the CPU benchmark's SDK loop process, which keeps the latest `Batch` of each of the 10,000.
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
    peak_rss_mb,
    poller_config,
    ratio,
    rss_mb,
    sim_process,
    stop_process,
    workdir,
    write_toml,
)
from bench.driver import pre_track

BATCHES = 10_000
TARGET_MB = 150.0
MIN_RUN = 30.0
TIMEOUT = 240.0


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
    with workdir("memory") as tmp, Mosquitto(tmp / "mosquitto") as broker, sim_process(BATCHES, tmp) as sim:
        state = tmp / "state.db"
        pre_track(state, "openai", sim.ids)
        raw = poller_config(
            sim.url,
            state,
            [{"kind": "mqtt", "name": "mqtt", "url": broker.url, "qos": 1}],
            service_port=free_port(),
            validating="5s",
            in_progress="5s",
            finalizing="5s",
            cancelling="5s",
            max_interval="10s",
        )
        config = write_toml(tmp / "config.toml", raw)
        log = (tmp / "daemon.log").open("ab")
        started = time.monotonic()
        proc = subprocess.Popen(daemon_command(config), cwd=ROOT, env=child_env(), stdout=log, stderr=log)
        log.close()
        samples: list[tuple[float, float]] = []
        seen_at: float | None = None
        drained_at: float | None = None
        try:
            while True:
                time.sleep(0.5)
                if proc.poll() is not None:
                    raise RuntimeError(f"batch-poller exited with {proc.returncode}; see {tmp / 'daemon.log'}")
                now = time.monotonic() - started
                samples.append((now, rss_mb(proc.pid)))
                if state.exists():
                    seen, pending, delivered = _progress(state)
                    if seen_at is None and seen >= BATCHES:
                        seen_at = now
                    if drained_at is None and seen >= BATCHES and pending == 0 and delivered >= BATCHES:
                        drained_at = now
                if drained_at is not None and now >= max(MIN_RUN, drained_at + 10):
                    break
                if now > TIMEOUT:
                    raise RuntimeError(f"not drained after {TIMEOUT:g}s: {_progress(state)}")
            peak = peak_rss_mb(proc.pid)
            final = rss_mb(proc.pid)
        finally:
            code = stop_process(proc)
        _, _, delivered = _progress(state)
    ctx["poller_peak_rss_mb"] = peak
    sdk = float(ctx.get("sdk_maxrss_mb", float("nan")))
    section.rows.append(
        Row(
            "Peak RSS, `batch-poller run` tracking 10,000 batches",
            f"{peak:.0f} MB",
            f"{sdk:.0f} MB (SDK loop process, 10,000 kept)" if sdk == sdk else "n/a",
            ratio(peak, sdk),
            f"≤ {TARGET_MB:.0f} MB",
            peak <= TARGET_MB,
        )
    )
    seen_s = "n/a" if seen_at is None else f"{seen_at:.1f}"
    drained_s = "n/a" if drained_at is None else f"{drained_at:.1f}"
    section.notes.append(
        f"All 10,000 seen {seen_s} s after start, all {delivered:,} MQTT deliveries acknowledged at "
        f"{drained_s} s; ran {samples[-1][0]:.0f} s; RSS at the end {final:.0f} MB, highest sampled "
        f"{max(r for _, r in samples):.0f} MB; exit code after SIGTERM {code}."
    )
    return section
