"""Benchmark 4, delivery: a burst of 5,000 events through the durable outbox, to MQTT and to a webhook.

A real `batch-poller run` process sees 5,000 batches for the first time: one event each (they are still
validating), detected page by page (50 list pages) and written to the outbox in the same transactions as
the batch rows; its delivery
worker sends them to one sink: a private Mosquitto (QoS 1, the event and the retained state message, so
two PUBACKs per event) or a local aiohttp receiver answering 204 (signed requests). Latency per event is
from detection (`events.detected_at`) to the acknowledgement (`outbox.updated_at`, written when the sink
returned); throughput is events / (last acknowledgement - first detection).

The alternative publishes the same 5,000 payloads with no outbox, from a process of its own: raw aiomqtt
(the same two QoS 1 messages per event, without the sink's MQTT 5 user properties, as many in flight as
the sink allows) and raw aiohttp POSTs (unsigned, as many concurrent as the sink allows). All payloads are ready when its clock starts, so its latency is
from that start. Target: outbox throughput ≥ 0.6 of raw MQTT and of raw aiohttp.

First sight of 100,000 batches: a real `batch-poller run` sees 100,000 validating batches (1,000 list
pages) and delivers every event to a file sink (each write fsynced before it is acknowledged); the figure
is from just before the process is spawned to the last acknowledgement. Target: ≤ 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Mosquitto,
    Row,
    Section,
    child_env,
    log_tail,
    percentile,
    poller_config,
    quick,
    ratio,
    ready_child,
    run_json_child,
    sim_process,
    stop_process,
    workdir,
)
from bench.memory import daemon_command
from tests.helpers import write_toml  # one TOML writer for the tests and the benchmarks

EVENTS = 5_000
REPS = 3
#: `--quick`: events in the burst (batches in the simulator).
QUICK_EVENTS = 200
TARGET = 0.6
TIMEOUT = 240.0
#: First sight of this many batches, every event to a file sink; target: all delivered this soon after start.
FIRST_SIGHT = 100_000
QUICK_FIRST_SIGHT = 1_000
FIRST_SIGHT_TARGET = 60.0
FIRST_SIGHT_TIMEOUT = 600.0
SECRET_ENV = "BENCH_WEBHOOK_SECRET"
MQTT_IN_FLIGHT = 16  # MqttSinkConfig.max_in_flight default
WEBHOOK_IN_FLIGHT = 4  # WebhookSinkConfig.max_concurrency default


def _progress(db: Path, sink: str) -> tuple[int, int]:
    """(batches seen, outbox rows of `sink` not yet delivered), read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        seen = conn.execute("SELECT COUNT(*) FROM batches WHERE status IS NOT NULL").fetchone()[0]
        waiting = conn.execute("SELECT COUNT(*) FROM outbox WHERE sink = ? AND state != 'delivered'", (sink,))
        return int(seen), int(waiting.fetchone()[0])
    finally:
        conn.close()


def _delivered(db: Path, sink: str) -> list[tuple[float, float]]:
    """(detected_at, acknowledged_at) of every delivered outbox row of `sink`."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(
            "SELECT e.detected_at, o.updated_at FROM outbox o JOIN events e ON e.id = o.event_id"
            " WHERE o.sink = ? AND o.state = 'delivered'",
            (sink,),
        ).fetchall()
    finally:
        conn.close()
    return [(float(d), float(a)) for d, a in rows]


def _payloads(db: Path, out: Path) -> None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT payload FROM events ORDER BY detected_at").fetchall()
    finally:
        conn.close()
    out.write_text("\n".join(r[0] for r in rows) + "\n")


def _poller_burst(
    tmp: Path, sim_url: str, ids: list[str], sink: dict[str, Any], rep: int, timeout: float = TIMEOUT
) -> dict[str, Any]:
    """Run `batch-poller run` until the sink acknowledged every first-sight event; the figures from its state."""
    from bench.driver import pre_track_sync  # noqa: PLC0415

    name = sink["name"]
    run_dir = tmp / f"{name}-{rep}"
    run_dir.mkdir()
    state = run_dir / "state.db"
    pre_track_sync(state, ids)
    hour = "1h"
    raw = poller_config(
        sim_url,
        state,
        [sink],
        validating=hour,
        in_progress=hour,
        finalizing=hour,
        cancelling=hour,
        max_interval=hour,
    )
    config = write_toml(run_dir / "config.toml", raw)
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    log = (run_dir / "daemon.log").open("ab")
    proc = subprocess.Popen(
        daemon_command(config), cwd=ROOT, env=child_env({SECRET_ENV: secret}), stdout=log, stderr=log
    )
    log.close()
    spawned = time.time()
    started = time.monotonic()
    try:
        while True:
            time.sleep(0.5)
            if proc.poll() is not None:
                raise RuntimeError(f"batch-poller exited with {proc.returncode}:\n{log_tail(run_dir / 'daemon.log')}")
            seen, waiting = _progress(state, name) if state.exists() else (0, 1)
            if (seen >= len(ids) and not waiting) or time.monotonic() - started > timeout:
                break
    finally:
        stop_process(proc)
    pairs = _delivered(state, name)
    if not pairs:
        raise RuntimeError(f"nothing was delivered to {name} within {timeout:g}s:\n{log_tail(run_dir / 'daemon.log')}")
    if name == "mqtt" and rep == 0:
        _payloads(state, tmp / "payloads.jsonl")
    first = min(d for d, _ in pairs)
    last = max(a for _, a in pairs)
    latencies = [a - d for d, a in pairs]
    return {
        "events": len(pairs),
        "throughput": len(pairs) / (last - first),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "detect_span": max(d for d, _ in pairs) - first,
        "span": last - first,
        "from_start": last - spawned,
        "complete": len(pairs) >= len(ids) and not _progress(state, name)[1],
    }


def first_sight(batches: int) -> dict[str, Any]:
    """A daemon's first sight of `batches` validating batches, every event to a file sink (fsync per write)."""
    with workdir("first-sight") as tmp, sim_process(batches, tmp, phase="validating") as sim:
        sink = {"kind": "file", "name": "file", "path": str(tmp / "events.jsonl")}
        return _poller_burst(tmp, sim.url, sim.ids, sink, 0, timeout=FIRST_SIGHT_TIMEOUT)


def outbox_bookkeeping(tmp: Path, queued: int, samples: int = 50) -> float:
    """Seconds of outbox work per delivered event with `queued` events waiting, without any sink.

    What the delivery worker asks the store for each event it sends, through the async SQLite store
    (its own thread, as in the daemon): the next due head (`claim_heads`, 15 other batches in flight)
    and, once acknowledged, `mark_delivered`.
    """
    from bench.startup import prepare_state  # noqa: PLC0415

    state = tmp / f"bookkeeping-{queued}.db"
    raw = poller_config("http://127.0.0.1:9/v1", state, [{"kind": "mqtt", "name": "diag", "url": "mqtt://127.0.0.1:9"}])
    prepare_state(state, raw, queued, sink="diag")
    return asyncio.run(_bookkeeping(state, samples))


async def _bookkeeping(state: Path, samples: int) -> float:
    from poller.store import open_store  # noqa: PLC0415

    async with open_store(state) as store:
        busy = {(row.source, row.batch_id) for row in await store.claim_heads("diag", time.time(), set(), 15)}
        started = time.perf_counter()
        done = 0
        for _ in range(samples):
            rows = await store.claim_heads("diag", time.time(), busy, 1)
            if not rows:
                break
            await store.mark_delivered("diag", [rows[0].event_id], time.time())
            done += 1
        return (time.perf_counter() - started) / max(done, 1)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput, with every run's throughput attached."""
    ordered = sorted(runs, key=lambda r: float(r["throughput"]))
    return ordered[len(ordered) // 2] | {"all": [r["throughput"] for r in runs]}


def run(ctx: dict[str, Any]) -> Section:
    section = Section("Delivery")
    events, reps = (QUICK_EVENTS, 1) if quick(ctx) else (EVENTS, REPS)
    with (
        workdir("delivery") as tmp,
        Mosquitto(tmp / "mosquitto") as broker,
        ready_child("bench.receiver", [], tmp / "receiver.log") as (_, hook_url),
        sim_process(events, tmp, phase="validating") as sim,
    ):
        mqtt_sink = {"kind": "mqtt", "name": "mqtt", "url": broker.url, "qos": 1}
        hook_sink = {"kind": "webhook", "name": "hook", "url": hook_url, "secret_env": SECRET_ENV}
        mqtt = _median_run([_poller_burst(tmp, sim.url, sim.ids, mqtt_sink, rep) for rep in range(reps)])
        hook = _median_run([_poller_burst(tmp, sim.url, sim.ids, hook_sink, rep) for rep in range(reps)])
        payloads = str(tmp / "payloads.jsonl")
        raw_mqtt = _median_run(
            [run_json_child("bench.delivery", "raw-mqtt", str(broker.port), payloads) for _ in range(reps)]
        )
        raw_hook = _median_run(
            [run_json_child("bench.delivery", "raw-webhook", hook_url, payloads) for _ in range(reps)]
        )
        bookkeeping = {n: outbox_bookkeeping(tmp, n) for n in (events, 100)}
    sight_n = QUICK_FIRST_SIGHT if quick(ctx) else FIRST_SIGHT
    sight = first_sight(sight_n)
    for label, ours, raw, target in (
        ("MQTT (PUBACK)", mqtt, raw_mqtt, True),
        ("webhook (2xx)", hook, raw_hook, True),
    ):
        r = ours["throughput"] / raw["throughput"]
        partial = "" if ours["complete"] else f" (only {ours['events']:,} within {TIMEOUT:g} s)"
        section.rows.append(
            Row(
                f"Burst of {events:,} events to {label}: throughput",
                f"{ours['throughput']:,.0f} events/s{partial}",
                f"{raw['throughput']:,.0f} events/s (raw, no outbox)",
                ratio(ours["throughput"], raw["throughput"]),
                f"≥ {TARGET}" if target else "(informational)",
                r >= TARGET if target else None,
            )
        )
        section.rows.append(
            Row(
                f"Burst to {label}: latency p50 / p99",
                f"{ours['p50'] * 1000:,.0f} / {ours['p99'] * 1000:,.0f} ms",
                f"{raw['p50'] * 1000:,.0f} / {raw['p99'] * 1000:,.0f} ms (raw, from burst start)",
                ratio(ours["p50"], raw["p50"]),
                "(informational)",
            )
        )
        section.notes.append(
            f"{label}, median of {reps} runs (events/s: {', '.join(f'{t:,.0f}' for t in ours['all'])}): "
            f"{ours['events']:,} events acknowledged {ours['span']:.2f} s after the first detection; detection "
            f"itself spanned {ours['detect_span']:.2f} s ({math.ceil(events / 100)} list pages). Raw, median of {reps} (events/s: "
            f"{', '.join(f'{t:,.0f}' for t in raw['all'])}): {raw['events']:,} in {raw['span']:.2f} s."
        )
    full, small = bookkeeping[events], bookkeeping[100]
    growth = full / small
    section.notes.append(
        f"Outbox bookkeeping per delivered event, no sink (`claim_heads` for the next head with 15 batches in "
        f"flight, then `mark_delivered`, on the async SQLite store): {full * 1000:.2f} ms with {events:,} events queued, i.e. at most "
        f"{1 / full:,.0f} events/s from the store alone; {small * 1000:.2f} ms ({1 / small:,.0f} events/s) with 100 "
        "queued."
        + (
            f" The store's cost per event grows {growth:.0f}-fold with the backlog, so a burst is drained at the "
            "pace of these queries while it is large."
            if growth > 5
            else ""
        )
    )
    ceiling = mqtt["events"] / mqtt["detect_span"] if mqtt["detect_span"] > 0 else float("inf")
    section.notes.append(
        "What limits it (profiled with pyinstrument in the daemon process; `python -m pyinstrument -m "
        "poller.cli run ...`): the measured window starts at the first detection, so it contains the "
        f"detection of all {events:,} batches (pydantic parsing, detection, the recorder's log line per event, "
        "the SQLite writes of batch rows, events and outbox rows), and detection runs on the same event loop "
        f"as delivery: here it spanned {mqtt['detect_span']:.2f} s, capping the figure at about "
        f"{ceiling:,.0f} events/s whatever delivery does. Delivery now keeps pace with detection (the last "
        f"acknowledgement came {mqtt['span'] - mqtt['detect_span']:.2f} s after the last detection): new "
        "outbox heads are handed to the worker in memory (`Recorded.heads`, no read-back), acknowledgements "
        "are recorded in one transaction per wake while the next sends go out, and MQTT 5 properties are "
        "packed once per event (they were packed by paho per message and per resend, 12 % of samples). Of "
        "the loop's time, aiomqtt/paho (PUBACK decoding, publishing) is the largest share, the same as for "
        "the raw client; detection is the next. Reaching 0.6 needs detection and delivery on different cores "
        "(a delivery process of its own), which this change does not do."
    )
    section.rows.append(
        Row(
            f"First sight of {sight_n:,} batches: every event delivered to a file sink",
            f"{sight['from_start']:.1f} s after start"
            + ("" if sight["complete"] else f" (only {sight['events']:,} within {FIRST_SIGHT_TIMEOUT:g} s)"),
            "",
            "",
            f"≤ {FIRST_SIGHT_TARGET:g} s",
            sight["complete"] and sight["from_start"] <= FIRST_SIGHT_TARGET,
        )
    )
    section.notes.append(
        f"First sight of {sight_n:,}: {sight['events']:,} events delivered; detection spanned "
        f"{sight['detect_span']:.1f} s ({math.ceil(sight_n / 100):,} list pages), the last acknowledgement "
        f"came {sight['span']:.1f} s after the first detection, p50 / p99 detection to acknowledgement "
        f"{sight['p50'] * 1000:,.0f} / {sight['p99'] * 1000:,.0f} ms. The file sink writes every line pending "
        "at once with one fsync (group commit); before, one fsync per event behind a lock."
    )
    return section


# -- the raw alternatives, each in a process of its own --------------------------------------------


def _load(path: Path) -> list[bytes]:
    return [line.encode() for line in path.read_text().splitlines() if line.strip()]


async def _raw_mqtt(port: int, payloads: list[bytes]) -> dict[str, Any]:
    import aiomqtt  # noqa: PLC0415

    from poller.domain.events import decode  # noqa: PLC0415
    from poller.sinks.mqtt_payload import state_payload  # noqa: PLC0415

    messages = []
    for payload in payloads:  # rendered before the clock starts: the raw publisher has them ready
        event = decode(payload)
        base = f"raw/{event.data.source}/{event.batch_id}"
        messages.append((f"{base}/event/{event.type}", payload, f"{base}/state", state_payload(event)))
    queue: asyncio.Queue[tuple[str, bytes, str, bytes]] = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)
    acks: list[float] = []
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        client.pending_calls_threshold = 2 * MQTT_IN_FLIGHT + 2
        started = time.perf_counter()

        async def worker() -> None:
            while not queue.empty():
                topic, payload, state_topic, state = queue.get_nowait()
                await client.publish(topic, payload, qos=1)
                await client.publish(state_topic, state, qos=1, retain=True)
                acks.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(MQTT_IN_FLIGHT)))
        span = time.perf_counter() - started
    return {"events": len(acks), "throughput": len(acks) / span, "span": span, **_quantiles(acks)}


async def _raw_webhook(url: str, payloads: list[bytes]) -> dict[str, Any]:
    import aiohttp  # noqa: PLC0415

    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)
    acks: list[float] = []
    connector = aiohttp.TCPConnector(limit=WEBHOOK_IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                headers = {"Content-Type": "application/json"}
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status // 100 != 2:
                        raise RuntimeError(f"receiver answered {response.status}")
                acks.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(WEBHOOK_IN_FLIGHT)))
        span = time.perf_counter() - started
    return {"events": len(acks), "throughput": len(acks) / span, "span": span, **_quantiles(acks)}


def _quantiles(latencies: list[float]) -> dict[str, float]:
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description="one raw publisher of the delivery benchmark")
    parser.add_argument("kind", choices=["raw-mqtt", "raw-webhook"])
    parser.add_argument("target")
    parser.add_argument("payloads", type=Path)
    args = parser.parse_args()
    payloads = _load(args.payloads)
    if args.kind == "raw-mqtt":
        result = asyncio.run(_raw_mqtt(int(args.target), payloads))
    else:
        result = asyncio.run(_raw_webhook(args.target, payloads))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
