"""Home Assistant MQTT discovery: the pure counting and payloads, then the MQTT sink against a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Self

import aiomqtt
import pytest

from poller.config import MqttSinkConfig, parse_config
from poller.domain.events import Event, encode
from poller.errors import ConfigError
from poller.sinks.mqtt import MqttSink
from poller.sinks.mqtt_discovery import HomeAssistant, object_id, summary
from tests.broker import Mosquitto
from tests.helpers import make_batch, make_event

PREFIX = "batch-poller"


def state(status: str) -> bytes:
    return json.dumps({"status": status, "batch_id": "x"}).encode()


def make(batch_id: str, status: str, *, source: str = "openai", event_type: str | None = None) -> Event:
    return make_event(
        source=source,
        batch=make_batch(status, batch_id, request_counts={"completed": 1, "failed": 0, "total": 4}),
        event_type=event_type or f"batch.{status}",
        status=status,
        previous_status="validating",
        sequence=2,
        created_at=1_700_000_060,
        detected_at=1_700_000_100.5,
    )


# -- pure -----------------------------------------------------------------------------------------------


def test_summary_counts_every_status_and_the_active_ones() -> None:
    counts = summary({"a": "in_progress", "b": "completed", "c": "validating", "d": "completed"})
    assert counts["total"] == 4
    assert counts["active"] == 2
    assert counts["completed"] == 2
    assert counts["failed"] == 0
    assert set(counts) >= {"validating", "in_progress", "finalizing", "cancelling", "expired", "cancelled"}


def test_observe_then_drain_announces_a_source_once_and_publishes_changed_counts() -> None:
    ha = HomeAssistant("mqtt", PREFIX)
    ha.observe(f"{PREFIX}/openai/batch_a/state", state("in_progress"))
    ha.observe(f"{PREFIX}/openai/batch_b/state", state("completed"))
    first = ha.drain()
    configs = [t for t, _ in first if t.endswith("/config")]
    assert configs[0] == "homeassistant/sensor/batch_poller_mqtt/openai_active/config"
    assert "homeassistant/sensor/batch_poller_mqtt/openai_completed/config" in configs
    assert first[-1] == (f"{PREFIX}/openai/summary", json.dumps(ha.counts("openai"), separators=(",", ":")).encode())
    assert ha.drain() == []  # nothing changed
    ha.observe(f"{PREFIX}/openai/batch_a/state", state("in_progress"))
    assert ha.drain() == []  # the same status again
    ha.observe(f"{PREFIX}/openai/batch_a/state", b"")  # cleared (batch.pruned)
    assert ha.drain() == [(f"{PREFIX}/openai/summary", json.dumps(ha.counts("openai"), separators=(",", ":")).encode())]
    assert ha.counts("openai")["total"] == 1


def test_per_batch_sensors_are_added_and_removed() -> None:
    ha = HomeAssistant("mqtt", PREFIX, batches=True)
    topic = f"{PREFIX}/openai/batch_a/state"
    ha.observe(topic, state("validating"))
    out = dict(ha.drain())
    config = json.loads(out["homeassistant/sensor/batch_poller_mqtt/batch_openai_batch_a/config"])
    assert config["state_topic"] == topic
    assert config["value_template"] == "{{ value_json.status }}"
    ha.observe(topic, b"")
    assert ("homeassistant/sensor/batch_poller_mqtt/batch_openai_batch_a/config", b"") in ha.drain()


def test_topics_that_are_not_batch_states_are_ignored() -> None:
    ha = HomeAssistant("mqtt", PREFIX)
    for topic in (
        f"{PREFIX}/availability",
        f"{PREFIX}/openai/summary",
        "other/openai/b/state",
        f"{PREFIX}/a/b/c/state",
    ):
        ha.observe(topic, state("completed"))
    ha.observe(f"{PREFIX}/openai/b/state", b"not json")
    assert ha.drain() == []


def test_object_ids_are_safe_and_distinct() -> None:
    assert object_id("openai", "batch_a") == "openai_batch_a"
    odd = object_id("my source", "b.1")
    assert all(c.isalnum() or c in "_-" for c in odd)
    assert odd != object_id("my_source", "b_1")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"homeassistant_batches": True}, "homeassistant_batches needs homeassistant = true"),
        ({"homeassistant": True, "homeassistant_prefix": "ha/#"}, "homeassistant_prefix"),
    ],
)
def test_bad_home_assistant_settings_name_the_key(extra: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sinks": [{"kind": "mqtt"} | extra]})
    assert problem in info.value.render()


# -- against Mosquitto ------------------------------------------------------------------------------------


class Watcher:
    """A plain subscriber that keeps the latest message of each topic (and whether it came retained)."""

    def __init__(self, broker: Mosquitto, *topics: str) -> None:
        self.topics = topics
        self.client = aiomqtt.Client("127.0.0.1", broker.port, identifier=f"test-ha-{uuid.uuid4().hex[:8]}")
        self.latest: dict[str, aiomqtt.Message] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        for topic in self.topics:
            await self.client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._collect(), name="test.ha-watcher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait((self._task,))
        await self.client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        async for message in self.client.messages:
            self.latest[message.topic.value] = message

    def json(self, topic: str) -> Any:
        """The latest JSON on a topic; None when it was cleared."""
        payload = self.latest[topic].payload
        assert isinstance(payload, bytes)
        return json.loads(payload) if payload else None


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def ha_sink(url: str, **kwargs: Any) -> MqttSink:
    config = MqttSinkConfig(kind="mqtt", url=url, homeassistant=True, **kwargs)
    return MqttSink("mqtt", config, environ={}, rand=lambda: 0.02)


def counts(w: Watcher, source: str) -> dict[str, int] | None:
    topic = f"{PREFIX}/{source}/summary"
    return w.json(topic) if topic in w.latest else None


async def test_discovery_configs_are_retained_and_their_state_topics_get_values(mosquitto: Mosquitto) -> None:
    events = [
        make("batch_a", "in_progress"),
        make("batch_b", "completed"),
        make("msgbatch_c", "failed", source="anthropic"),
    ]
    async with ha_sink(mosquitto.url, homeassistant_batches=True) as sink:
        await sink.wait_connected()
        for ev in events:
            await asyncio.wait_for(sink.send(ev, encode(ev)), 10)
        async with Watcher(mosquitto, f"{PREFIX}/+/summary") as live:
            await eventually(lambda: (counts(live, "openai") or {}).get("total") == 2)
            await eventually(lambda: (counts(live, "anthropic") or {}).get("failed") == 1)
    # A subscriber arriving later gets every config retained, and every state topic they name has a value.
    async with Watcher(mosquitto, "homeassistant/#", f"{PREFIX}/#") as late:
        await eventually(lambda: sum(t.startswith("homeassistant/") for t in late.latest) >= 2 * 10 + 3)
        configs = {t: late.json(t) for t in late.latest if t.startswith("homeassistant/sensor/")}
        assert all(late.latest[t].retain for t in configs)
        assert "homeassistant/sensor/batch_poller_mqtt/openai_active/config" in configs
        assert "homeassistant/sensor/batch_poller_mqtt/batch_anthropic_msgbatch_c/config" in configs
        for topic, config in configs.items():
            assert topic.endswith(f"/{config['unique_id'].removeprefix('batch_poller_mqtt_')}/config")
            assert config["availability_topic"] == f"{PREFIX}/availability"
            assert late.latest[config["state_topic"]].payload, config["state_topic"]
            assert config["device"]["identifiers"]
        assert late.latest[f"{PREFIX}/availability"].payload == b"offline"  # the sink closed cleanly
        openai = late.json(f"{PREFIX}/openai/summary")
        assert (openai["total"], openai["active"], openai["in_progress"], openai["completed"]) == (2, 1, 1, 1)
        status = late.json(f"{PREFIX}/openai/batch_a/state")["status"]
        assert status == "in_progress"


async def test_counts_survive_a_restart_and_follow_pruning(mosquitto: Mosquitto) -> None:
    first = [make("batch_a", "in_progress"), make("batch_b", "completed")]
    async with Watcher(mosquitto, f"{PREFIX}/+/summary", "homeassistant/sensor/+/+/config") as live:
        async with ha_sink(mosquitto.url, homeassistant_batches=True) as sink:
            await sink.wait_connected()
            for ev in first:
                await asyncio.wait_for(sink.send(ev, encode(ev)), 10)
            await eventually(lambda: (counts(live, "openai") or {}).get("total") == 2)
        await live.client.publish(f"{PREFIX}/openai/summary", b"", qos=1, retain=True)
        await eventually(lambda: counts(live, "openai") is None)
        # A new sink (a restarted daemon) sends nothing yet: its counts come from the retained states.
        async with ha_sink(mosquitto.url, homeassistant_batches=True) as sink:
            await sink.wait_connected()
            await eventually(lambda: (counts(live, "openai") or {}).get("total") == 2)
            gone = make("batch_b", "completed", event_type="batch.pruned")
            await asyncio.wait_for(sink.send(gone, encode(gone)), 10)
            await eventually(lambda: (counts(live, "openai") or {}).get("total") == 1)
            removed = "homeassistant/sensor/batch_poller_mqtt/batch_openai_batch_b/config"
            await eventually(lambda: removed in live.latest and live.latest[removed].payload == b"")
