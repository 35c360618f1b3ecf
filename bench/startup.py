"""Benchmark 5, start-up: from process start to READY=1 with a large state file.

The state file is prepared beforehand through the daemon's own first sight (a source's
`Refresher.refresh` against the simulator, into the async SQLite store): 100,000 tracked batches, still
validating, each already seen once (snapshot, detection state, schedule) as `Tracker.observe` leaves
them, and the 100,000 events of that first sight pending in the outbox for an MQTT sink whose broker is
unreachable, so the rows stay pending. `batch-poller run` (HTTP service on) is started with
NOTIFY_SOCKET pointing at a datagram socket this benchmark owns; the figure is the time from just before
the process is spawned to the READY=1 datagram (interpreter start and imports included), the median of
five starts. The alternative is the same start with an empty state file. The second row is when the
first STATUS= line counting all 100,000 tracked batches arrived (every source's runner has loaded them;
the daemon sends READY=1 only after that, so the two nearly coincide).
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import (
    KEY,
    ROOT,
    SOURCE,
    Row,
    Section,
    child_env,
    devnull_logging,
    free_port,
    log_tail,
    median,
    poller_config,
    quick,
    ratio,
    stop_process,
    workdir,
)
from bench.memory import daemon_command
from tests.helpers import write_toml  # one TOML writer for the tests and the benchmarks

BATCHES = 100_000
REPS = 5
#: `--quick`: tracked batches in the full state file.
QUICK_BATCHES = 200
TARGET = 2.0
SINK = "mqtt"


def prepare_state(state: Path, raw_config: dict[str, Any], batches: int, sink: str = SINK) -> int:
    """Write `batches` seen batches and their first-sight events (pending for `sink`); returns pending rows."""
    return asyncio.run(_prepare_state(state, raw_config, batches, sink))


async def _prepare_state(state: Path, raw_config: dict[str, Any], batches: int, sink: str) -> int:
    """First sight of `batches` validating batches through the daemon's own refresh, against the simulator.

    The source's `Refresher.refresh` of every due batch (list walk through the provider, `Tracker.observe`,
    `Recorder.record`: rows, events and outbox rows in one transaction per page), as a runner's first
    turn does it; only the source's `base_url` is the simulator's instead of the config's.
    """
    from bench.simproc import steady_sim  # noqa: PLC0415
    from poller.config import parse_config  # noqa: PLC0415
    from poller.delivery.routing import Routes  # noqa: PLC0415
    from poller.domain.schedule import Pacer  # noqa: PLC0415
    from poller.metrics import Metrics  # noqa: PLC0415
    from poller.polling.health import SourceHealth  # noqa: PLC0415
    from poller.polling.recorder import Recorder  # noqa: PLC0415
    from poller.polling.refresh import Refresher, SourceContext  # noqa: PLC0415
    from poller.polling.runner import tracker_settings  # noqa: PLC0415
    from poller.polling.tracker import Tracker  # noqa: PLC0415
    from poller.providers import make_provider  # noqa: PLC0415
    from poller.sim import serve  # noqa: PLC0415
    from poller.store import ACTIVE, open_store  # noqa: PLC0415

    devnull_logging("warning")  # the recorder logs every event it records, as in the daemon
    config = parse_config(raw_config)
    poll = config.poll
    metrics = Metrics()
    source_metrics = metrics.source(SOURCE)
    intervals, policy, backoff = tracker_settings(poll)
    tracker = Tracker(SOURCE, intervals=intervals, policy=policy, backoff=backoff, rand=random.Random(0).random)
    # Validating batches: first sight of each is one event, so the outbox holds one row per batch.
    sim, ids = steady_sim(batches, seed=5, phase="validating")
    now = time.time()
    async with serve(sim) as url, open_store(state) as store:
        source = config.named_sources()[SOURCE].model_copy(update={"base_url": url})
        await store.track(SOURCE, ids, "bench", now)
        tracker.load(await store.batches(SOURCE, [ACTIVE]))
        recorder = Recorder(store, Routes(config.named_sinks()), metrics)
        health = SourceHealth(SOURCE, source_metrics, started_at=now)
        ctx = SourceContext(SOURCE, source.provider_name, tracker, store, recorder, health, source_metrics, time.time)
        provider = make_provider(
            source,
            KEY,
            metrics=source_metrics,
            pacer=Pacer(poll.max_requests_per_second),
            max_concurrency=poll.max_concurrency,
        )
        async with provider:
            tracker.page_size = provider.capabilities.page_size
            ctx.provider = provider
            await Refresher(ctx).refresh(tracker.due(time.time()))
        unseen = sum(1 for b in tracker.active() if b.knowledge.status is None)
        if len(tracker.active()) != len(ids) or unseen:
            raise RuntimeError(f"{unseen} of the {len(ids):,} prepared batches were not seen")
        return int((await store.outbox_stats()).get(sink, {}).get("pending", 0))


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
    section = Section("Start-up")
    size, reps = (QUICK_BATCHES, 1) if quick(ctx) else (BATCHES, REPS)
    results: dict[int, tuple[list[float], list[float]]] = {}
    pending = 0
    with workdir("startup") as tmp:
        address = str(tmp / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(address)
            for batches in (size, 0):
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
                for _ in range(reps):
                    ready, loaded = _start(config, notify, address, batches)
                    readies.append(ready)
                    loads.append(loaded)
                results[batches] = (readies, loads)
    full, empty = results[size], results[0]
    ready_full, ready_empty = median(full[0]), median(empty[0])
    section.rows.append(
        Row(
            f"Start to READY=1, {size:,} tracked + {pending:,} pending rows",
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
        f"{', '.join(f'{x:.2f}' for x in full[0])} ({size:,}) and {', '.join(f'{x:.2f}' for x in empty[0])} "
        f"(empty); loaded: {', '.join(f'{x:.2f}' for x in full[1])} and {', '.join(f'{x:.2f}' for x in empty[1])}."
    )
    return section
