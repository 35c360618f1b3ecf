"""Two `[[sources]]` in one daemon, each a simulator on its own port: every event carries its source,
ids never collide between sources, MQTT topics are per source, and health is told per source.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest

from poller.errors import ConfigError
from poller.runtime.control import DaemonControl
from poller.runtime.daemon import Daemon
from poller.sim import Fault, OpenAISim, SimClock, serve
from tests.broker import Mosquitto
from tests.helpers import (
    FINAL,
    KEY_ENV,
    check_event_log,
    config_dict,
    eventually,
    fast_sim,
    make_config,
    read_jsonl,
    running,
    until,
)

SOURCES = ("alpha", "beta")


def two_sources(urls: dict[str, str], ids: list[str], state: Path, sinks: list[dict[str, Any]]) -> dict[str, Any]:
    """A config with one `[[sources]]` entry per simulator, each tracking `ids`."""
    raw = config_dict("http://placeholder", state, sinks)
    del raw["source"]
    raw["sources"] = [
        {"name": name, "provider": "openai", "base_url": url, "api_key_env": KEY_ENV, "track": ids}
        for name, url in urls.items()
    ]
    return raw


def by_source(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        out.setdefault(event["data"]["source"], []).append(event)
    return out


def seen_validating(path: Path, ids: list[str]) -> bool:
    """Every batch's first event arrived from every source."""
    got = {(e["data"]["source"], e["data"]["id"]) for e in read_jsonl(path) if e["type"] == "batch.validating"}
    return got >= {(s, i) for s in SOURCES for i in ids}


async def settled(daemon: Daemon) -> bool:
    """No batch of any source is active and every sink delivered everything."""
    return not await daemon.store.batches(None, states=["active"]) and not await daemon.store.deliveries()


class Subscriber:
    """Every message under batch-poller/, as a consumer sees it."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.messages: list[aiomqtt.Message] = []
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="test.subscriber")
        await asyncio.wait_for(self._subscribed.wait(), 10)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait((self._task,))

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.broker.port, identifier="sources-subscriber") as client:
            await client.subscribe("batch-poller/#", qos=1)
            self._subscribed.set()
            async for message in client.messages:
                self.messages.append(message)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """(topic, event) of every event message."""
        return [
            (m.topic.value, json.loads(m.payload))
            for m in self.messages
            if "/event/" in m.topic.value and isinstance(m.payload, bytes)
        ]


async def retained_states(broker: Mosquitto) -> dict[str, dict[str, Any]]:
    """The retained state documents, by topic, as a consumer connecting now sees them."""
    found: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="sources-late") as client:
        await client.subscribe("batch-poller/+/+/state", qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    found[message.topic.value] = json.loads(message.payload)
        except TimeoutError:
            pass  # retained messages arrive right after SUBACK; a quiet second means they are all in
    return found


@pytest.mark.slow
async def test_two_sources_keep_their_events_ids_and_topics_apart(mosquitto: Mosquitto, tmp_path: Path) -> None:
    # The same seed draws the same ids: both sources have batches of the same ids, with their own timing.
    sims = {name: fast_sim(speed=0.001, seed=51) for name in SOURCES}
    ids = sims["alpha"].create_batches(8)
    assert sims["beta"].create_batches(8) == ids
    async with (
        serve(sims["alpha"]) as alpha_url,
        serve(sims["beta"]) as beta_url,
        Subscriber(mosquitto) as subscriber,
    ):
        events_file = tmp_path / "events.jsonl"
        sinks = [{"kind": "file", "path": str(events_file)}, {"kind": "mqtt", "url": mosquitto.url}]
        raw = two_sources({"alpha": alpha_url, "beta": beta_url}, ids, tmp_path / "state.db", sinks)
        async with running(make_config(raw)) as daemon:
            control = DaemonControl(daemon)
            assert set(daemon.runners) == set(SOURCES)
            await eventually(lambda: seen_validating(events_file, ids), timeout=30)
            status = await control.status()
            assert status["ready"], status["reasons"]
            for name in SOURCES:
                view = status["sources"][name]
                assert (view["provider"], view["health"], view["misconfigured"]) == ("openai", "ok", None)
                assert view["tracked"] == {"validating": len(ids)}
            assert status["tracked"] == {"validating": 2 * len(ids)}

            for name, speed in zip(SOURCES, (40, 25), strict=True):
                clock = sims[name].clock
                assert isinstance(clock, SimClock)
                clock.speed = speed
            await eventually(lambda: all(s.get(i)["status"] in FINAL for s in sims.values() for i in ids), timeout=60)
            await until(lambda: settled(daemon), timeout=30)
            file_ids = {e["id"] for e in read_jsonl(events_file)}
            await eventually(lambda: {e["id"] for _, e in subscriber.events()} >= file_ids, timeout=10)

        events = read_jsonl(events_file)
        grouped = by_source(events)
        assert set(grouped) == set(SOURCES)
        for name in SOURCES:
            check_event_log(grouped[name], sims[name], ids)

        # One batch id, one event type, two sources: two events, each with its own id.
        keyed = {
            name: {(e["data"]["id"], e["type"], e["data"]["sequence"]): e["id"] for e in grouped[name]}
            for name in SOURCES
        }
        common = keyed["alpha"].keys() & keyed["beta"].keys()
        assert common, "both sources saw the same batches go through the same statuses"
        assert all(keyed["alpha"][k] != keyed["beta"][k] for k in common)
        assert not {e["id"] for e in grouped["alpha"]} & {e["id"] for e in grouped["beta"]}

        # MQTT: each event under its own source's topics, nothing lost, nothing shared.
        topics: dict[str, set[str]] = {name: set() for name in SOURCES}
        for topic, event in subscriber.events():
            data = event["data"]
            assert topic == f"batch-poller/{data['source']}/{data['id']}/event/{event['type']}"
            topics[data["source"]].add(topic)
        assert not topics["alpha"] & topics["beta"]
        assert {e["id"] for _, e in subscriber.events()} == {e["id"] for e in events}
        states = await retained_states(mosquitto)
        for name in SOURCES:
            assert {i: states[f"batch-poller/{name}/{i}/state"]["status"] for i in ids} == {
                i: sims[name].get(i)["status"] for i in ids
            }
            assert all(states[f"batch-poller/{name}/{i}/state"]["source"] == name for i in ids)


async def test_readiness_and_status_are_per_source(tmp_path: Path) -> None:
    sims: dict[str, OpenAISim] = {name: fast_sim(speed=0.001, seed=52 + n) for n, name in enumerate(SOURCES)}
    tracked = {name: sim.create_batches(3) for name, sim in sims.items()}
    async with serve(sims["alpha"]) as alpha_url, serve(sims["beta"]) as beta_url:
        events_file = tmp_path / "events.jsonl"
        raw = two_sources({"alpha": alpha_url, "beta": beta_url}, [], tmp_path / "state.db", [])
        raw["sinks"] = [{"kind": "file", "path": str(events_file)}]
        for entry in raw["sources"]:
            entry["track"] = tracked[entry["name"]]
        async with running(make_config(raw)) as daemon:
            control = DaemonControl(daemon)
            with pytest.raises(ConfigError):
                daemon.runner(None)  # two sources: a command must name one
            await eventually(lambda: len(read_jsonl(events_file)) == 6)
            assert control.readiness()[0]

            sims["beta"].inject(Fault(kind="html404", count=1_000_000))  # beta's base_url is wrong
            beta = daemon.runner("beta")
            await eventually(lambda: beta.health.misconfigured is not None, timeout=20)
            ready, detail = control.readiness()
            assert not ready
            assert detail["reasons"], detail
            assert all(reason.startswith("beta: ") and "base_url" in reason for reason in detail["reasons"])
            status = await control.status()
            assert status["sources"]["alpha"]["health"] == "ok"
            assert status["sources"]["alpha"]["misconfigured"] is None
            assert status["sources"]["beta"]["health"] == "failing"
            assert status["sources"]["beta"]["misconfigured"] is not None
            assert "beta: API MISCONFIGURED" in status["status_line"]
            assert "alpha" not in status["status_line"]
            up = {
                s.labels["source"]: s.value
                for family in daemon.metrics.registry.collect()
                for s in family.samples
                if s.name == "batch_poller_source_up"
            }
            assert up == {"alpha": 1.0, "beta": 0.0}

            # alpha is not held up by beta: its batches go on to their final statuses.
            alpha_clock = sims["alpha"].clock
            assert isinstance(alpha_clock, SimClock)
            alpha_clock.speed = 40
            await eventually(lambda: all(sims["alpha"].get(i)["status"] in FINAL for i in tracked["alpha"]), timeout=60)
            await eventually(lambda: not daemon.runner("alpha").tracker.active(), timeout=20)
            assert len(beta.tracker.active()) == 3
            # A batch tracked by name goes to that source only.
            [extra] = sims["beta"].create_batches(1)
            added, _ = await control.track([extra], "api", "beta")
            assert added == [extra]
            assert extra not in daemon.runner("alpha").tracker.batches

            sims["beta"].clear_faults()
            await eventually(lambda: control.readiness()[0], timeout=20)
            await eventually(lambda: beta.tracker.batches[extra].knowledge.status == "validating", timeout=20)
            assert (await control.status())["sources"]["beta"]["health"] == "ok"
        check_event_log(by_source(read_jsonl(events_file))["alpha"], sims["alpha"], tracked["alpha"])
