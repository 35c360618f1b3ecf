"""poller.sinks.mqtt against a real Mosquitto: topics, payloads, retained state, availability, outages, TLS, auth."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest
import structlog

from poller.config import MqttSinkConfig, parse_config
from poller.domain.events import Event, encode
from poller.errors import ConfigError, DeliveryError
from poller.providers.openai_types import Batch
from poller.sinks.mqtt import MqttSink
from tests import helpers
from tests.broker import Mosquitto, MosquittoFactory, TlsFiles
from tests.helpers import make_event

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "batch-poller"


def fast() -> float:
    """A jitter source that keeps reconnect delays tiny, so outage tests take milliseconds, not seconds."""
    return 0.02


def make_batch(batch_id: str, status: str = "in_progress", completed: int = 3) -> Batch:
    return helpers.make_batch(
        status,
        batch_id,
        in_progress_at=1_700_000_060,
        request_counts={"completed": completed, "failed": 0, "total": 10},
        metadata={"team": "ml"},
    )


def make(batch_id: str, status: str = "in_progress", *, seq: int = 1, source: str = "openai") -> Event:
    return make_event(
        source=source,
        batch=make_batch(batch_id, status),
        event_type=f"batch.{status}",
        status=status,
        previous_status="validating",
        sequence=seq,
        created_at=1_700_000_060 + seq,
        detected_at=1_700_000_100.5 + seq,
    )


def pruned(batch_id: str) -> Event:
    return make_event(
        source="openai",
        batch=make_batch(batch_id, "completed"),
        event_type="batch.pruned",
        status="completed",
        previous_status="completed",
        sequence=9,
        created_at=1_700_100_000,
        detected_at=1_700_100_000.0,
    )


def config(url: str, **kwargs: Any) -> MqttSinkConfig:
    return MqttSinkConfig(kind="mqtt", url=url, **kwargs)


def sink_for(url: str, name: str = "mqtt", *, environ: dict[str, str] | None = None, **kwargs: Any) -> MqttSink:
    return MqttSink(name, config(url, **kwargs), environ=environ or {}, rand=fast)


async def send(sink: MqttSink, event: Event, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        await sink.send(event, encode(event))


class Subscriber:
    """A plain aiomqtt client recording every message under `topic`, retained ones included."""

    def __init__(
        self,
        broker: Mosquitto,
        topic: str = f"{PREFIX}/#",
        *,
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
        tls_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.topic = topic
        self.client = aiomqtt.Client(
            "127.0.0.1",
            broker.port,
            identifier=f"test-sub-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
            tls_context=tls_context,
            username=username,
            password=password,
        )
        self.messages: list[aiomqtt.Message] = []
        self._new = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        await self.client.subscribe(self.topic, qos=1)
        self._task = asyncio.create_task(self._collect(), name="test.subscriber")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait((self._task,))
        await self.client.__aexit__(exc_type, exc, tb)

    async def _collect(self) -> None:
        async for message in self.client.messages:
            self.messages.append(message)
            self._new.set()

    def on(self, topic: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.value == topic]

    async def wait(self, predicate: Callable[[aiomqtt.Message], bool], timeout: float = 5.0) -> aiomqtt.Message:
        async with asyncio.timeout(timeout):
            while True:
                for m in self.messages:
                    if predicate(m):
                        return m
                self._new.clear()
                await self._new.wait()

    async def wait_topic(self, topic: str, payload: bytes | None = None, timeout: float = 5.0) -> aiomqtt.Message:
        return await self.wait(lambda m: m.topic.value == topic and (payload is None or m.payload == payload), timeout)

    async def settle(self, seconds: float = 0.3) -> None:
        """Give the broker time to deliver anything else (used only to show something did NOT arrive)."""
        await asyncio.sleep(seconds)


def user_properties(message: aiomqtt.Message) -> dict[str, str]:
    props = message.properties
    assert props is not None
    return dict(getattr(props, "UserProperty", []))


def body(message: aiomqtt.Message) -> Any:
    assert isinstance(message.payload, bytes)
    return json.loads(message.payload) if message.payload else None


def status_of(message: aiomqtt.Message) -> str | None:
    state = body(message)
    return state["status"] if isinstance(state, dict) else None


def state_topic(batch_id: str, source: str = "openai") -> str:
    return f"{PREFIX}/{source}/{batch_id}/state"


def event_topic(event: Event) -> str:
    return f"{PREFIX}/{event.data.source}/{event.batch_id}/event/{event.type}"


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- topics and payloads ----------------------------------------------------------------------------------


async def test_events_of_several_batches_arrive_on_their_topics(mosquitto: Mosquitto) -> None:
    events = [make(f"batch_{i}", status, seq=n) for i in range(3) for n, status in enumerate(["in_progress"], 1)]
    events.append(make("batch_0", "completed", seq=2))
    async with Subscriber(mosquitto) as sub, sink_for(mosquitto.url) as sink:
        for event in events:
            await send(sink, event)
        for event in events:
            got = await sub.wait_topic(event_topic(event))
            assert got.payload == encode(event)  # the openai format passes the canonical bytes unchanged
            assert got.qos == 1
            assert not got.retain
        last = await sub.wait(lambda m: m.topic.value == state_topic("batch_0") and status_of(m) == "completed")
    state = body(last)
    completed = events[-1]
    assert state == {
        "batch_id": "batch_0",
        "source": "openai",
        "status": "completed",
        "previous_status": "validating",
        "provider": "openai",
        "provider_status": "completed",
        "request_counts": {"completed": 3, "failed": 0, "total": 10},
        "eta": None,
        "updated_at": completed.created_at,
        "detected_at": completed.data.detected_at,
        "sequence": 2,
        "event_id": completed.id,
        "type": "batch.completed",
        "batch": completed.data.batch,
    }
    assert state["batch"]["metadata"] == {"team": "ml"}


async def test_cloudevents_format(mosquitto: Mosquitto) -> None:
    event = make("batch_ce", "completed")
    async with Subscriber(mosquitto) as sub, sink_for(mosquitto.url, format="cloudevents") as sink:
        await send(sink, event)
        got = await sub.wait_topic(event_topic(event))
        state = await sub.wait_topic(state_topic("batch_ce"))
    assert isinstance(got.payload, bytes)
    body = json.loads(got.payload)
    assert body == {
        "specversion": "1.0",
        "id": event.id,
        "source": "batch-poller/openai",
        "type": "batch.completed",
        "subject": "batch_ce",
        "time": "2023-11-14T22:14:21Z",
        "datacontenttype": "application/json",
        "data": event.data.model_dump(mode="json"),
    }
    assert got.properties is not None
    assert got.properties.ContentType == "application/cloudevents+json"
    # the retained state is a document, not an event: the same JSON in either format
    assert state.properties is not None
    assert state.properties.ContentType == "application/json"
    assert isinstance(state.payload, bytes)
    assert json.loads(state.payload)["status"] == "completed"


async def test_mqtt5_properties(mosquitto: Mosquitto) -> None:
    event = make("batch_props")
    async with Subscriber(mosquitto) as sub, sink_for(mosquitto.url, message_expiry="1h") as sink:
        await send(sink, event)
        got = await sub.wait_topic(event_topic(event))
        state = await sub.wait_topic(state_topic("batch_props"))
    assert got.properties is not None
    assert got.properties.ContentType == "application/json"
    assert got.properties.PayloadFormatIndicator == 1
    assert user_properties(got) == {"event_id": event.id, "event_type": "batch.in_progress", "batch_id": "batch_props"}
    assert 3590 <= got.properties.MessageExpiryInterval <= 3600
    assert user_properties(state)["event_id"] == event.id
    assert not hasattr(state.properties, "MessageExpiryInterval")  # the state stays until the batch is pruned


async def test_protocol_311_works_without_properties(mosquitto: Mosquitto) -> None:
    event = make("batch_v311")
    v311 = aiomqtt.ProtocolVersion.V311
    async with Subscriber(mosquitto, protocol=v311) as sub, sink_for(mosquitto.url, protocol="3.1.1") as sink:
        await send(sink, event)
        got = await sub.wait_topic(event_topic(event))
        await sub.wait_topic(state_topic("batch_v311"))
        await sub.wait_topic(f"{PREFIX}/availability", b"online")
    assert got.payload == encode(event)


async def test_qos_2_and_custom_prefix(mosquitto: Mosquitto) -> None:
    event = make("batch_q2")
    async with (
        Subscriber(mosquitto, "acme/poller/#") as sub,
        sink_for(mosquitto.url, qos=2, topic_prefix="acme/poller") as sink,
    ):
        await send(sink, event)
        got = await sub.wait_topic("acme/poller/openai/batch_q2/event/batch.in_progress")
        await sub.wait_topic("acme/poller/availability", b"online")
    assert got.payload == encode(event)


# -- retained state and availability ----------------------------------------------------------------------


async def test_retained_state_reaches_late_subscribers_and_pruning_clears_it(mosquitto: Mosquitto) -> None:
    async with sink_for(mosquitto.url) as sink:
        await send(sink, make("batch_keep", "completed"))
        await send(sink, make("batch_gone", "completed"))
        async with Subscriber(mosquitto) as late:
            kept = await late.wait_topic(state_topic("batch_keep"))
            await late.wait_topic(state_topic("batch_gone"))
            assert kept.retain
            assert isinstance(kept.payload, bytes)
            assert json.loads(kept.payload)["status"] == "completed"
            assert not late.on(event_topic(make("batch_keep", "completed")))  # events are not retained

            await send(sink, pruned("batch_gone"))
            cleared = await late.wait(lambda m: m.topic.value == state_topic("batch_gone") and m.payload == b"")
            assert not cleared.retain  # delivered live
        async with Subscriber(mosquitto) as later:
            await later.wait_topic(state_topic("batch_keep"))
            await later.settle()
            assert not later.on(state_topic("batch_gone"))
            assert not [m for m in later.messages if "/event/batch.pruned" in m.topic.value]


async def test_availability_online_retained_and_offline_on_clean_exit(mosquitto: Mosquitto) -> None:
    availability = f"{PREFIX}/availability"
    sink = sink_for(mosquitto.url)
    assert sink.health() == "connecting"
    async with sink:
        await asyncio.wait_for(sink.wait_connected(), 5)
        assert sink.connected
        assert sink.health() == "ok"
        async with Subscriber(mosquitto) as late:
            online = await late.wait_topic(availability, b"online")
            assert online.retain
    assert not sink.connected
    async with Subscriber(mosquitto) as after:
        offline = await after.wait_topic(availability)
        assert offline.payload == b"offline"
        assert offline.retain


async def test_last_will_offline_when_the_process_is_killed(mosquitto: Mosquitto) -> None:
    script = (
        "import asyncio, sys\n"
        "from poller.config import MqttSinkConfig\n"
        "from poller.sinks.mqtt import MqttSink\n"
        "async def main():\n"
        "    async with MqttSink('will', MqttSinkConfig(kind='mqtt', url=sys.argv[1], keepalive=60)) as sink:\n"
        "        await sink.wait_connected()\n"
        "        print('ready', flush=True)\n"
        "        await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    availability = f"{PREFIX}/availability"
    async with Subscriber(mosquitto) as sub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, mosquitto.url, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(20):
                while (line := await proc.stdout.readline()) != b"ready\n":  # structlog prints to stdout too
                    assert line, "the child exited before connecting"
            await sub.wait_topic(availability, b"online")
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        await sub.wait_topic(availability, b"offline")  # the broker published the Will
    async with Subscriber(mosquitto) as after:
        will = await after.wait_topic(availability)
        assert (will.payload, will.retain) == (b"offline", True)


# -- outages ----------------------------------------------------------------------------------------------


async def test_broker_started_after_the_sink(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory(start=False)
    sink = sink_for(broker.url)
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        async with sink:
            assert time.monotonic() - started < 0.5  # entering never waits for the broker
            sending = asyncio.create_task(send(sink, make("batch_late"), timeout=30))
            await eventually(lambda: sink.health() == "failing", what="the first failed attempt")
            await asyncio.sleep(0.3)
            assert not sending.done()
            broker.start()
            await sending
            assert sink.health() == "ok"
            async with Subscriber(broker) as sub:
                await sub.wait_topic(state_topic("batch_late"))
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, warnings  # the outage is logged once, not per attempt
    assert warnings[0]["event"] == "mqtt broker unavailable; retrying"
    assert "refused" in warnings[0]["error"].lower()
    assert [e for e in logs if e["event"] == "mqtt connected"]


async def test_sends_wait_through_a_broker_restart(mosquitto: Mosquitto) -> None:
    with structlog.testing.capture_logs() as logs:
        async with sink_for(mosquitto.url) as sink:
            await send(sink, make("batch_before"))
            mosquitto.stop()
            await eventually(lambda: not sink.connected, what="the sink to notice the broker is gone")
            assert sink.health() == "failing"
            waiting = [asyncio.create_task(send(sink, make(f"batch_r{i}"), timeout=30)) for i in range(5)]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in waiting)
            mosquitto.start()  # same port
            await asyncio.gather(*waiting)
            assert sink.health() == "ok"
            async with Subscriber(mosquitto) as sub:
                for i in range(5):
                    await sub.wait_topic(state_topic(f"batch_r{i}"))
                await sub.wait_topic(f"{PREFIX}/availability", b"online")  # re-announced after reconnecting
    events = [e["event"] for e in logs if e["log_level"] in {"warning", "info"}]
    assert events == ["mqtt connected", "mqtt connection lost; reconnecting", "mqtt recovered", "mqtt disconnected"]


async def test_connection_lost_before_the_ack_is_a_retryable_error(mosquitto: Mosquitto) -> None:
    async with sink_for(mosquitto.url) as sink:
        await asyncio.wait_for(sink.wait_connected(), 5)
        mosquitto.pause()  # the connection stays open, nothing is acknowledged
        try:
            in_flight = asyncio.create_task(send(sink, make("batch_mid"), timeout=30))
            await asyncio.sleep(0.3)
            assert not in_flight.done()
        finally:
            mosquitto.kill()
        with pytest.raises(DeliveryError) as caught:
            await in_flight
        assert caught.value.retryable
        assert caught.value.sink == "mqtt"
        mosquitto.start()
        await send(sink, make("batch_mid"), timeout=30)  # the retry goes through


async def test_cancelled_send_is_clean_and_exit_does_not_wait_for_the_broker(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory(start=False)
    async with sink_for(broker.url) as sink:
        waiting = asyncio.create_task(sink.send(make("batch_x"), b"{}"))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        still_waiting = asyncio.create_task(sink.send(make("batch_y"), b"{}"))
        await asyncio.sleep(0.1)
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    with pytest.raises(DeliveryError) as caught:
        await still_waiting  # a send still waiting when the sink closes gives up, retryably
    assert caught.value.retryable
    assert [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith("poller.mqtt")] == []


# -- topic safety -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch_id", "source"),
    [
        ("batch/../x", "openai"),
        ("batch_+", "openai"),
        ("batch_#", "openai"),
        ("batch_1", "a/b"),
        ("bad\x00id", "openai"),
    ],
)
async def test_unsafe_topic_levels_are_rejected_for_good(batch_id: str, source: str) -> None:
    sink = sink_for("mqtt://127.0.0.1:1")  # never connects: the check comes first
    async with sink:
        with pytest.raises(DeliveryError) as caught:
            await sink.send(make(batch_id, source=source), b"{}")
    assert not caught.value.retryable
    assert "cannot be an MQTT topic level" in str(caught.value)


def test_config_problems_fail_up_front(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:  # refused by the config schema already
        parse_config({"sinks": [{"kind": "mqtt", "name": "m", "url": "mqtt://user:secretpw@127.0.0.1:1883"}]})
    assert caught.value.key == "sinks[m].url"
    assert "secretpw" not in caught.value.render()
    with pytest.raises(ConfigError) as caught:
        MqttSink("m", config("mqtts://127.0.0.1", ca_file=tmp_path / "missing.pem"), environ={})
    assert caught.value.key == "sinks.m.ca_file"
    with pytest.raises(ConfigError) as caught:
        MqttSink("m", config("mqtt://127.0.0.1", password_env="NOPE"), environ={})
    assert caught.value.key == "sinks.m.password_env"


def test_defaults(tmp_path: Path) -> None:
    sink = MqttSink("events", config("mqtts://broker.example"), environ={})
    assert (sink.host, sink.port, sink.tls) == ("broker.example", 8883, True)
    assert sink.client_id.startswith("batch-poller-events-")
    assert sink.max_in_flight == 16
    assert sink.retry_schedule is None
    plain = MqttSink("m", config("mqtt://broker.example", max_in_flight=3, client_id="fixed"), environ={})
    assert (plain.port, plain.tls, plain.client_id, plain.max_in_flight) == (1883, False, "fixed", 3)


# -- TLS --------------------------------------------------------------------------------------------------


def tls_broker(
    factory: MosquittoFactory, tls: TlsFiles, *, wrong_name: bool = False, mutual: bool = False
) -> Mosquitto:
    cert, key = (tls.wrong_name_cert, tls.wrong_name_key) if wrong_name else (tls.server_cert, tls.server_key)
    return factory(tls=(tls.ca, cert, key), require_certificate=mutual)


async def test_tls_with_the_right_ca_connects(mosquitto_factory: MosquittoFactory, tls_files: TlsFiles) -> None:
    broker = tls_broker(mosquitto_factory, tls_files)
    assert broker.url.startswith("mqtts://")
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    for url in (broker.url, f"mqtts://localhost:{broker.port}"):
        async with Subscriber(broker, tls_context=context) as sub, sink_for(url, ca_file=tls_files.ca) as sink:
            await send(sink, make("batch_tls"))
            assert sink.health() == "ok"
            await sub.wait_topic(state_topic("batch_tls"))


async def test_tls_with_the_wrong_ca_is_refused(mosquitto_factory: MosquittoFactory, tls_files: TlsFiles) -> None:
    broker = tls_broker(mosquitto_factory, tls_files)
    with structlog.testing.capture_logs() as logs:
        async with sink_for(broker.url, ca_file=tls_files.other_ca) as sink:
            with pytest.raises(TimeoutError):
                await send(sink, make("batch_tls"), timeout=1.0)
            assert sink.health() == "failing"
            assert not sink.connected
    warning = next(e for e in logs if e["log_level"] == "warning")
    assert "certificate verify failed" in warning["error"]


async def test_tls_host_name_is_checked_unless_tls_insecure(
    mosquitto_factory: MosquittoFactory, tls_files: TlsFiles
) -> None:
    broker = tls_broker(mosquitto_factory, tls_files, wrong_name=True)
    with structlog.testing.capture_logs() as logs:
        async with sink_for(broker.url, ca_file=tls_files.ca) as strict:
            with pytest.raises(TimeoutError):
                await send(strict, make("batch_tls"), timeout=1.0)
    assert any("match" in e.get("error", "") for e in logs), logs
    async with sink_for(broker.url, ca_file=tls_files.ca, tls_insecure=True) as lax:
        await send(lax, make("batch_tls"))  # the chain is still verified, only the name is not


async def test_tls_client_certificate(mosquitto_factory: MosquittoFactory, tls_files: TlsFiles) -> None:
    broker = tls_broker(mosquitto_factory, tls_files, mutual=True)
    kwargs: dict[str, Any] = {
        "ca_file": tls_files.ca,
        "cert_file": tls_files.client_cert,
        "key_file": tls_files.client_key,
    }
    async with sink_for(broker.url, **kwargs) as sink:
        await send(sink, make("batch_mtls"))
    async with sink_for(broker.url, ca_file=tls_files.ca) as anonymous:
        with pytest.raises(TimeoutError):
            await send(anonymous, make("batch_mtls"), timeout=1.0)


# -- authentication ---------------------------------------------------------------------------------------

PASSWORD = "correct-horse-battery-staple"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_username_and_password(mosquitto_factory: MosquittoFactory, tmp_path: Path, protocol: str) -> None:
    broker = mosquitto_factory(users={"poller": PASSWORD, "reader": "reader-pw"})
    secret = tmp_path / "mqtt-password"
    secret.write_text(PASSWORD + "\n")
    async with Subscriber(broker, username="reader", password="reader-pw") as sub:
        async with sink_for(broker.url, username="poller", password_env="MQTT_PW", protocol=protocol,
                            environ={"MQTT_PW": PASSWORD}) as sink:  # fmt: skip
            await send(sink, make("batch_env"))
        async with sink_for(broker.url, username="poller", password_file=secret, protocol=protocol) as sink:
            await send(sink, make("batch_file"))
        await sub.wait_topic(state_topic("batch_env"))
        await sub.wait_topic(state_topic("batch_file"))


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_wrong_password_is_refused_logged_once_and_retried(
    mosquitto_factory: MosquittoFactory, protocol: str
) -> None:
    broker = mosquitto_factory(users={"poller": PASSWORD})
    wrong = "definitely-not-the-password"
    with structlog.testing.capture_logs() as logs:
        async with sink_for(
            broker.url, username="poller", password_env="MQTT_PW", protocol=protocol, environ={"MQTT_PW": wrong}
        ) as sink:
            with pytest.raises(TimeoutError):
                await send(sink, make("batch_auth"), timeout=1.0)
            assert sink.health() == "failing"
    refusals = broker.log_text().count("not authorised")
    assert refusals >= 2, broker.log_text()  # it kept trying
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, warnings
    warning = warnings[0]
    assert warning["event"] == "mqtt broker unavailable; retrying"
    assert warning["reason_code"] in {5, 134, 135}
    assert any(word in warning["error"].lower() for word in ("not authori", "bad user name or password")), warning
    assert "username" in warning["fix"]
    assert wrong not in repr(logs)
    assert PASSWORD not in repr(logs)
