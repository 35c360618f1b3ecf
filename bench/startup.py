"""Benchmark 5, start-up: from process start to READY=1 with a large state file.

The state file is prepared beforehand with `poller.store.Store`: 10,000 tracked batches, each already
seen once (snapshot, detection state, schedule) as `Tracker.observe` leaves them, and the 10,000 events
of that first sight pending in the outbox for an MQTT sink whose broker is unreachable, so the rows stay
pending. `batch-poller run` (HTTP service on) is started with NOTIFY_SOCKET pointing at a datagram socket
this benchmark owns; the figure is the time from just before the process is spawned to the READY=1
datagram (interpreter start and imports included), the median of five starts. The alternative is the
same start with an empty state file. The notes add when the first STATUS= line counting all 10,000
tracked batches arrived (the poll loop has loaded them).
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Row,
    Section,
    child_env,
    free_port,
    log_tail,
    median,
    poller_config,
    ratio,
    stop_process,
    workdir,
)
from bench.memory import daemon_command
from tests.helpers import write_toml  # one TOML writer for the tests and the benchmarks

BATCHES = 10_000
REPS = 5
TARGET = 1.0
SINK = "mqtt"


def prepare_state(state: Path, raw_config: dict[str, Any], batches: int, sink: str = SINK) -> int:
    """Write `batches` seen batches and their first-sight events (pending for `sink`); returns pending rows."""
    from bench.simproc import steady_sim  # noqa: PLC0415
    from poller.config import parse_config  # noqa: PLC0415
    from poller.daemon import tracker_settings  # noqa: PLC0415
    from poller.models import Batch  # noqa: PLC0415
    from poller.records import TrackedBatch  # noqa: PLC0415
    from poller.store import Store  # noqa: PLC0415
    from poller.tracker import Tracker  # noqa: PLC0415

    config = parse_config(raw_config)
    intervals, policy, backoff = tracker_settings(config)
    tracker = Tracker(
        "openai",
        intervals=intervals,
        policy=policy,
        backoff=backoff,
        router=lambda _type, _meta: [sink],
        rand=random.Random(0).random,
    )
    sim, ids = steady_sim(batches, seed=5)
    now = time.time()
    with Store(state) as store:
        store.track("openai", ids, "bench", now)
        for start in range(0, len(ids), 500):
            updates = []
            for batch_id in ids[start : start + 500]:
                tracker.batches[batch_id] = TrackedBatch("openai", batch_id, "bench", now)
                observation = tracker.observe(Batch.model_validate(sim.get(batch_id)), now)
                if observation is not None and observation.update is not None:
                    updates.append(observation.update)
            store.save(updates, now)
        return int(store.outbox_stats().get(sink, {}).get("pending", 0))


def _start(config: Path, notify: socket.socket, address: str, expected: int) -> tuple[float, float]:
    """Spawn the daemon; seconds to READY=1 and to the STATUS= line that counts every tracked batch."""
    notify.settimeout(0.0)
    while True:  # drop anything a previous run left in the socket
        try:
            notify.recv(65536)
        except BlockingIOError:
            break
    started = time.perf_counter()
    proc = subprocess.Popen(
        daemon_command(config),
        cwd=ROOT,
        env=child_env({"NOTIFY_SOCKET": address}),
        stdout=subprocess.DEVNULL,
        stderr=(config.parent / "daemon.log").open("ab"),
    )
    ready = loaded = None
    try:
        notify.settimeout(30)
        while ready is None or loaded is None:
            message = notify.recv(65536).decode()
            now = time.perf_counter() - started
            fields = dict(line.split("=", 1) for line in message.splitlines() if "=" in line)
            if fields.get("READY") == "1" and ready is None:
                ready = now
            status = fields.get("STATUS", "")
            if status.startswith("tracking ") and status.split()[1] == str(expected) and loaded is None:
                loaded = now
    except TimeoutError:
        log = log_tail(config.parent / "daemon.log")
        raise RuntimeError(f"no READY=1 / STATUS= within 30 s:\n{log}") from None
    finally:
        stop_process(proc)
    return ready, loaded


def run(ctx: dict[str, Any]) -> Section:
    del ctx
    section = Section("Start-up")
    results: dict[int, tuple[list[float], list[float]]] = {}
    pending = 0
    with workdir("startup") as tmp:
        address = str(tmp / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(address)
            for batches in (BATCHES, 0):
                run_dir = tmp / f"state-{batches}"
                run_dir.mkdir()
                state = run_dir / "state.db"
                raw = poller_config(
                    "http://127.0.0.1:9/v1",  # nothing is due before the first interval ends
                    state,
                    [{"kind": "mqtt", "name": SINK, "url": f"mqtt://127.0.0.1:{free_port()}"}],
                    service_port=free_port(),
                )
                raw["service"]["shutdown_timeout"] = "1s"
                if batches:
                    pending = prepare_state(state, raw, batches)
                config = write_toml(run_dir / "config.toml", raw)
                readies, loads = [], []
                for _ in range(REPS):
                    ready, loaded = _start(config, notify, address, batches)
                    readies.append(ready)
                    loads.append(loaded)
                results[batches] = (readies, loads)
    full, empty = results[BATCHES], results[0]
    ready_full, ready_empty = median(full[0]), median(empty[0])
    section.rows.append(
        Row(
            "Start to READY=1, 10,000 tracked + 10,000 pending rows",
            f"{ready_full:.2f} s",
            f"{ready_empty:.2f} s (empty state)",
            ratio(ready_full, ready_empty),
            f"≤ {TARGET:g} s",
            ready_full <= TARGET,
        )
    )
    section.rows.append(
        Row(
            "Start to first STATUS= with all tracked batches loaded",
            f"{median(full[1]):.2f} s",
            f"{median(empty[1]):.2f} s (empty state)",
            ratio(median(full[1]), median(empty[1])),
            "(informational)",
        )
    )
    section.notes.append(
        f"{pending:,} outbox rows pending before the runs. READY=1 per start (s): "
        f"{', '.join(f'{x:.2f}' for x in full[0])} (10,000) and {', '.join(f'{x:.2f}' for x in empty[0])} "
        f"(empty); loaded: {', '.join(f'{x:.2f}' for x in full[1])} and {', '.join(f'{x:.2f}' for x in empty[1])}."
    )
    return section
