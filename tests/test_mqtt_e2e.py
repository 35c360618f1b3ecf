"""The daemon end to end through the MQTT sink: simulated API, real Mosquitto, real SQLite, real subprocesses."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest

from poller.runtime.daemon import Daemon
from poller.sim import OpenAISim, SimClock, serve
from tests.broker import Mosquitto, MosquittoFactory
from tests.helpers import (
    FINAL,
    check_event_log,
    config_dict,
    eventually,
    fast_sim,
    make_config,
    read_jsonl,
    running,
    start_daemon_process,
    stop_process,
    until,
    write_toml,
)

pytestmark = pytest.mark.slow

AVAILABILITY = "batch-poller/availability"


class Recorder:
    """A consumer as it should be written: persistent session (clean_session=False, QoS 1), reconnects forever.

    It records every message it gets, so a broker restart loses nothing it was owed (with a persisting broker).
    """

    def __init__(self, broker: Mosquitto, client_id: str = "e2e-recorder") -> None:
        self.broker = broker
        self.client_id = client_id
        self.messages: list[aiomqtt.Message] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="test.recorder")
        await asyncio.wait_for(self.subscribed.wait(), 10)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait((self._task,))

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.broker.port,
                    identifier=self.client_id,
                    protocol=aiomqtt.ProtocolVersion.V311,
                    clean_session=False,
                ) as client:
                    await client.subscribe("batch-poller/#", qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        self.messages.append(message)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    def events(self) -> list[dict[str, Any]]:
        """Every event message, as the OpenAI-shaped envelope (CloudEvents ones checked and mapped back)."""
        out = []
        for m in self.messages:
            if "/event/" not in m.topic.value or not isinstance(m.payload, bytes):
                continue
            body = json.loads(m.payload)
            if "specversion" in body:
                assert body["specversion"] == "1.0"
                assert body["subject"] == body["data"]["id"]
                assert body["datacontenttype"] == "application/json"
                assert m.topic.value.endswith("/event/" + body["type"])
                body = {"id": body["id"], "type": body["type"], "data": body["data"]}
            out.append(body)
        return out

    def unique_events(self) -> list[dict[str, Any]]:
        """At-least-once: a publish whose ack was lost comes again under the same id; keep first sightings."""
        return list({e["id"]: e for e in reversed(self.events())}.values())[::-1]

    def availability(self) -> list[bytes]:
        return [m.payload for m in self.messages if m.topic.value == AVAILABILITY and isinstance(m.payload, bytes)]


async def retained_states(broker: Mosquitto) -> dict[str, dict[str, Any]]:
    """The retained state of every batch, as a consumer connecting now sees it."""
    states: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="e2e-late") as client:
        await client.subscribe("batch-poller/+/+/state", qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    assert message.retain
                    assert isinstance(message.payload, bytes)
                    state = json.loads(message.payload)
                    states[state["batch_id"]] = state
        except TimeoutError:
            pass  # retained messages arrive right after SUBACK; a quiet second means they are all in
    return states


async def none_active(daemon: Daemon) -> bool:
    return not await daemon.store.batches(daemon.runner(None).name, states=["active"])


async def all_delivered(daemon: Daemon) -> bool:
    return not await daemon.store.deliveries()


def delivered_ids(path: Path) -> set[str]:
    return {e["id"] for e in read_jsonl(path)}


async def start_the_clock(sim: OpenAISim, recorder: Recorder, ids: list[str], speed: float) -> None:
    """Let simulated time run once every batch's first event arrived over MQTT.

    The simulator starts (almost) frozen so the daemon sees every batch while it is still validating,
    however long the daemon takes to start: what the tests compare is then the full lifecycle.
    """

    def all_seen_validating() -> bool:
        return {e["data"]["id"] for e in recorder.events() if e["type"] == "batch.validating"} >= set(ids)

    await eventually(all_seen_validating, timeout=30)
    assert isinstance(sim.clock, SimClock)
    sim.clock.speed = speed


def check_ordered_per_batch(events: list[dict[str, Any]]) -> None:
    by_batch: dict[str, list[int]] = {}
    for event in events:
        by_batch.setdefault(event["data"]["id"], []).append(event["data"]["sequence"])
    for batch_id, seqs in by_batch.items():
        assert seqs == sorted(seqs), f"{batch_id}: out of order {seqs}"


@pytest.mark.parametrize("fmt", ["openai", "cloudevents"])
async def test_twenty_batches_through_mqtt(mosquitto: Mosquitto, tmp_path: Path, fmt: str) -> None:
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url, Recorder(mosquitto) as recorder:
        ids = sim.create_batches(20)
        events_file = tmp_path / "events.jsonl"
        sinks = [{"kind": "mqtt", "url": mosquitto.url, "format": fmt}, {"kind": "file", "path": str(events_file)}]
        raw = config_dict(url, tmp_path / "state.db", sinks)
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            await start_the_clock(sim, recorder, ids, speed=40)
            await eventually(lambda: all(sim.get(i)["status"] in FINAL for i in ids), timeout=60)
            await until(lambda: none_active(daemon), timeout=20)
            await until(lambda: all_delivered(daemon), timeout=20)
            await eventually(lambda: {e["id"] for e in recorder.events()} >= delivered_ids(events_file), timeout=10)
            assert daemon.sinks.workers["mqtt"].sink.health() == "ok"
        events = recorder.events()
        assert len(events) == len({e["id"] for e in events}), "no outage, so no duplicates"
        assert {e["id"] for e in events} == delivered_ids(events_file)  # MQTT got what the file got
        check_ordered_per_batch(events)
        check_event_log(events, sim, ids)
        states = await retained_states(mosquitto)
        assert {i: s["status"] for i, s in states.items()} == {i: sim.get(i)["status"] for i in ids}
        assert recorder.availability()[:1] == [b"online"]
        assert recorder.availability()[-1] == b"offline"  # the daemon said goodbye on shutdown


async def test_broker_outage_mid_run_loses_nothing(mosquitto_factory: MosquittoFactory, tmp_path: Path) -> None:
    broker = mosquitto_factory(persistence=True)
    sim = fast_sim(speed=0.001, seed=3)
    async with serve(sim) as url, Recorder(broker) as recorder:
        ids = sim.create_batches(20)
        events_file = tmp_path / "events.jsonl"
        sinks = [{"kind": "mqtt", "url": broker.url}, {"kind": "file", "path": str(events_file)}]
        raw = config_dict(url, tmp_path / "state.db", sinks)
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            sink = daemon.sinks.workers["mqtt"].sink
            await start_the_clock(sim, recorder, ids, speed=12)
            await eventually(lambda: len(recorder.events()) >= 30, timeout=30)
            broker.stop()
            await eventually(lambda: sink.health() == "failing", timeout=10)
            behind = len(delivered_ids(events_file))
            # Transitions keep being detected and queued while the broker is away.
            await eventually(lambda: len(delivered_ids(events_file)) >= behind + 5, timeout=30)
            assert await daemon.store.deliveries("mqtt"), "rows wait in the outbox during the outage"
            assert sink.health() == "failing"
            broker.start()
            await eventually(lambda: sink.health() == "ok", timeout=40)
            await eventually(lambda: all(sim.get(i)["status"] in FINAL for i in ids), timeout=60)
            await until(lambda: none_active(daemon), timeout=20)
            await until(lambda: all_delivered(daemon), timeout=40)
            await eventually(lambda: {e["id"] for e in recorder.events()} >= delivered_ids(events_file), timeout=20)
        unique = recorder.unique_events()
        assert {e["id"] for e in unique} == delivered_ids(events_file)
        check_ordered_per_batch(unique)
        check_event_log(unique, sim, ids)
        states = await retained_states(broker)
        assert {i: s["status"] for i, s in states.items()} == {i: sim.get(i)["status"] for i in ids}


async def test_daemon_killed_with_sigkill(mosquitto: Mosquitto, tmp_path: Path) -> None:
    sim = fast_sim(speed=0.001, seed=11)
    async with serve(sim) as url, Recorder(mosquitto) as recorder:
        ids = sim.create_batches(12)
        raw = config_dict(url, str(tmp_path / "state.db"), [{"kind": "mqtt", "url": mosquitto.url}])
        raw["source"]["track"] = ids
        config = write_toml(tmp_path / "config.toml", raw)
        log = tmp_path / "daemon.log"

        proc = await start_daemon_process(config, log)
        try:
            await start_the_clock(sim, recorder, ids, speed=15)
            await eventually(lambda: len(recorder.events()) >= 20, timeout=30)
        finally:
            proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await eventually(lambda: recorder.availability()[-1:] == [b"offline"], timeout=10)  # the Last Will
        before = len(recorder.events())
        # Transitions keep happening while the daemon is dead.
        at_kill = {i: sim.get(i)["status"] for i in ids}
        await eventually(lambda: sum(sim.get(i)["status"] != at_kill[i] for i in ids) >= 3, timeout=30)

        proc = await start_daemon_process(config, log)
        try:
            await eventually(lambda: recorder.availability()[-1:] == [b"online"], timeout=20)
            await eventually(lambda: all(sim.get(i)["status"] in FINAL for i in ids), timeout=60)
            await eventually(
                lambda: {e["data"]["id"] for e in recorder.events() if e["data"]["status"] in FINAL} >= set(ids),
                timeout=30,
            )
        finally:
            assert await stop_process(proc) == 0
        assert len(recorder.events()) > before
        unique = recorder.unique_events()
        by_key: dict[tuple[str, str, int], str] = {}
        for event in unique:
            by_key.setdefault((event["data"]["id"], event["type"], event["data"]["sequence"]), event["id"])
        assert len(by_key) == len(unique), "an event was re-emitted under a new id"
        check_ordered_per_batch(unique)
        check_event_log(unique, sim, ids)
        states = await retained_states(mosquitto)
        assert {i: s["status"] for i, s in states.items()} == {i: sim.get(i)["status"] for i in ids}
        assert recorder.availability()[-1] == b"offline"  # and a clean goodbye on SIGTERM
