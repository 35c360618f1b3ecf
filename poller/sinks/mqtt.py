"""The MQTT sink: each event on its own topic, the batch's latest state retained, availability via a Last Will.

Topics (``prefix`` is ``topic_prefix``, ``source`` the event's source, ``id`` the batch id):

- ``{prefix}/{source}/{id}/event/{type}``: the event, QoS from config, not retained;
- ``{prefix}/{source}/{id}/state``: the batch's latest state, retained (cleared by ``batch.pruned``);
- ``{prefix}/availability``: ``online``/``offline``, retained, ``offline`` also as the Last Will.

`send` returns once the broker acknowledged both messages (PUBACK for QoS 1, PUBCOMP for QoS 2); with
QoS 0 it returns once they were written. A connection lost before that raises a retryable DeliveryError,
so a redelivery may duplicate a message: consumers deduplicate by ``event_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from poller import __version__
from poller.config import MqttSinkConfig, read_secret
from poller.domain.events import CLOUDEVENTS_CONTENT_TYPE, Event, encode_cloudevent
from poller.domain.schedule import Rand, full_jitter
from poller.errors import ConfigError, DeliveryError
from poller.sinks.mqtt_discovery import HomeAssistant
from poller.sinks.mqtt_payload import describe, level, state_payload

log = structlog.get_logger("poller.sinks.mqtt")

#: Reconnect backoff: full jitter from half a second, doubling, never more than 30 s apart.
BACKOFF_BASE: Final = 0.5
BACKOFF_CAP: Final = 30.0
#: How long `__aexit__` waits for the broker to acknowledge the retained ``offline``.
GOODBYE_TIMEOUT: Final = 5.0
ONLINE: Final = b"online"
OFFLINE: Final = b"offline"
PRUNED: Final = "batch.pruned"
JSON_CONTENT_TYPE: Final = "application/json"
#: CONNACK codes that mean the credentials were refused (3.1.1: 4, 5; MQTT 5: 0x86, 0x87).
_AUTH_CODES: Final = frozenset({4, 5, 134, 135})
_MAX_TOPIC_BYTES: Final = 65535
#: How often changed Home Assistant counts are published, at most.
HA_INTERVAL: Final = 1.0


@dataclass(frozen=True, slots=True)
class _Message:
    topic: str
    payload: bytes
    retain: bool
    properties: Properties | None


@dataclass(slots=True)
class _Session:
    """One live connection; `ended` resolves when it is gone, so sends waiting for acks stop waiting."""

    client: aiomqtt.Client
    ended: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails: paho drops the socket unclosed then (an fd held until GC)."""

    def do_handshake(self, block: bool = False) -> None:  # ssl's signature
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class MqttSink:
    """Publishes events to an MQTT broker (3.1.1 or 5), reconnecting forever in one background task."""

    retry_schedule: Sequence[float] | None = None

    def __init__(
        self,
        name: str,
        config: MqttSinkConfig,
        *,
        environ: dict[str, str] | None = None,
        rand: Rand = random.random,
    ) -> None:
        self.name = name
        self.config = config
        self.max_in_flight = config.max_in_flight
        self._rand = rand
        self._templates: dict[tuple[str, float | None], bytes] = {}
        self._key = f"sinks.{name}"
        # The URL, its TLS options and the password pair were validated with the config.
        self.host: str = config.host
        self.tls = config.tls
        self.port: int = config.port
        self._tls_context = self._make_tls_context() if self.tls else None
        self._password: str | None = None
        if config.password_env or config.password_file:
            self._password = read_secret(f"{self._key}.password", config.password_env, config.password_file, environ)
        self.client_id = config.client_id or f"batch-poller-{name}-{socket.gethostname()}"
        self.availability_topic = f"{config.topic_prefix}/availability"
        self._v5 = config.protocol == "5"
        self._ha: HomeAssistant | None = None
        if config.homeassistant:
            self._ha = HomeAssistant(
                name, config.topic_prefix, config.homeassistant_prefix, config.homeassistant_batches, __version__
            )

        self._task: asyncio.Task[None] | None = None
        self._session: _Session | None = None
        # Resolves to the next live session, or to None once the sink is closed.
        self._ready: asyncio.Future[_Session | None] | None = None
        self._up = asyncio.Event()
        self._closed = False
        self._ever_connected = False
        self._outage_since: float | None = None
        self._outage_reason: str | None = None
        self._attempts = 0

    def _make_tls_context(self) -> ssl.SSLContext:
        """Verification is always on; `tls_insecure` only skips the host name check, and only when set."""
        cfg = self.config
        try:
            context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
            if cfg.cert_file is not None and cfg.key_file is not None:
                context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{self._key}.ca_file",
                f"cannot load the TLS files: {exc}",
                "point ca_file, cert_file and key_file at readable PEM files",
            ) from None
        if cfg.tls_insecure:
            context.check_hostname = False
        context.sslsocket_class = _ClosingSSLSocket
        return context

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._session is not None

    async def wait_connected(self) -> None:
        """Return once the sink is connected (immediately if it is)."""
        await self._up.wait()

    def health(self) -> str:
        if self._session is not None:
            return "ok"
        return "failing" if self._outage_since is not None else "connecting"

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError(f"mqtt sink {self.name!r} is already running")
        self._closed = False
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"poller.mqtt[{self.name}].connection")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        session = self._session
        if session is not None:
            # A clean goodbye: the broker drops the Will on a normal DISCONNECT, so say offline ourselves.
            with contextlib.suppress(aiomqtt.MqttError):
                await session.client.publish(
                    self.availability_topic, OFFLINE, qos=1, retain=True, timeout=GOODBYE_TIMEOUT
                )
        task, self._task = self._task, None
        if task is not None:
            task.cancel()  # the task's `async with client` sends DISCONNECT on the way out
            _, hung = await asyncio.wait((task,), timeout=GOODBYE_TIMEOUT)
            if hung:  # a wedged socket must not outlast systemd's stop timeout: give up on the goodbye
                log.warning("mqtt disconnect did not finish; closing anyway", sink=self.name)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        if self._session is None and self._ever_connected:
            log.info("mqtt disconnected", sink=self.name)

    # -- the connection task -----------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        """A fresh client per connection, so nothing queued in a dead session is replayed behind our back."""
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.config.username,
            password=self._password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.availability_topic, OFFLINE, qos=1, retain=True),
            keepalive=self.config.keepalive,
            tls_context=self._tls_context,
        )
        client.pending_calls_threshold = 2 * self.max_in_flight + 2  # each send holds up to one publish
        return client

    async def _run(self) -> None:
        """Connect, announce ``online``, wait for the connection to end; repeat forever with backoff."""
        while True:
            try:
                async with self._client() as client:
                    await client.publish(self.availability_topic, ONLINE, qos=1, retain=True)
                    self._on_up(client)
                    try:
                        if self._ha is not None:
                            await self._home_assistant(client, self._ha)
                        async for _ in client.messages:
                            pass  # nothing is subscribed: the iterator only raises, when the connection ends
                    finally:
                        self._on_down()
            except aiomqtt.MqttError as exc:
                self._on_failure(exc)
            except Exception as exc:  # a bug must not end reconnection for good
                log.exception("mqtt connection failed unexpectedly", sink=self.name)
                self._on_failure(exc)
            await asyncio.sleep(full_jitter(self._attempts, BACKOFF_BASE, BACKOFF_CAP, self._rand))

    async def _home_assistant(self, client: aiomqtt.Client, ha: HomeAssistant) -> None:
        """Count batches from the retained states on the broker and publish discovery and counts from them."""
        ha.reset()
        await client.subscribe(ha.subscription, qos=1)
        publisher = asyncio.create_task(self._ha_publish(client, ha), name=f"poller.mqtt[{self.name}].homeassistant")
        try:
            async for message in client.messages:
                payload = message.payload
                ha.observe(str(message.topic), bytes(payload) if isinstance(payload, bytes | bytearray) else b"")
        finally:
            publisher.cancel()
            await asyncio.wait((publisher,))

    async def _ha_publish(self, client: aiomqtt.Client, ha: HomeAssistant) -> None:
        while True:
            try:
                for topic, payload in ha.drain():
                    await client.publish(topic, payload, qos=1, retain=True)
            except aiomqtt.MqttError as exc:  # the connection's end is handled by the receive loop
                log.debug("home assistant publish failed", sink=self.name, error=describe(exc)[0])
            await asyncio.sleep(HA_INTERVAL)

    def _on_up(self, client: aiomqtt.Client) -> None:
        session = _Session(client)
        self._session = session
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(session)
        self._up.set()
        fields: dict[str, Any] = {"sink": self.name, "broker": f"{self.host}:{self.port}", "client_id": self.client_id}
        if self._outage_since is not None:
            fields |= {"down_for": round(time.monotonic() - self._outage_since, 3), "attempts": self._attempts}
        log.info("mqtt recovered" if self._ever_connected else "mqtt connected", **fields)
        self._ever_connected = True
        self._outage_since = self._outage_reason = None
        self._attempts = 0

    def _on_down(self) -> None:
        session, self._session = self._session, None
        self._up.clear()
        if session is not None and not session.ended.done():
            session.ended.set_result(None)
        if self._ready is None or self._ready.done():
            self._ready = asyncio.get_running_loop().create_future()

    def _on_failure(self, exc: Exception) -> None:
        """Log an outage when it starts (and when its reason changes), not every failed attempt."""
        self._attempts += 1
        reason, code = describe(exc)
        fields: dict[str, Any] = {
            "sink": self.name,
            "broker": f"{self.host}:{self.port}",
            "error": reason,
            "error_type": type(exc).__name__,
            "reason_code": code,
        }
        if code in _AUTH_CODES:
            fields["fix"] = f"check {self._key}.username and its password secret"
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            lost = self._ever_connected
            log.warning("mqtt connection lost; reconnecting" if lost else "mqtt broker unavailable; retrying", **fields)
        elif isinstance(exc, MqttConnectError) and reason != self._outage_reason:
            # The broker is back but refuses us (credentials, ACL): worth a line even mid-outage.
            log.warning("mqtt broker refuses the connection", attempts=self._attempts, **fields)
        else:
            log.debug("mqtt connection attempt failed", attempts=self._attempts, **fields)
        self._outage_reason = reason

    # -- sending -----------------------------------------------------------------------------------------

    async def send(self, event: Event, payload: bytes) -> None:
        """Publish the event and the retained state; return after the broker acknowledged both."""
        messages = self.messages(event, payload)
        session = await self._wait_session()
        # aiomqtt's publish returns after PUBACK (QoS 1) / PUBCOMP (QoS 2). It does not notice a lost
        # connection, hence no timeout: the sends race the session's end. Both messages go out at once
        # (paho writes them in order) and both acknowledgements are awaited.
        publishing = [asyncio.ensure_future(self._publish(session.client, m)) for m in messages]
        try:
            await _settled(publishing, session.ended)
        finally:
            unfinished = [task for task in publishing if not task.done()]
            for task in unfinished:
                task.cancel()
            if unfinished:
                await asyncio.wait(unfinished)
        # A publish that aiomqtt cancelled (its connection ended) counts as a lost connection too.
        if any(task.cancelled() for task in publishing):
            raise DeliveryError(self.name, "connection lost before the broker acknowledged", retryable=True)
        error = next((e for task in publishing if (e := task.exception()) is not None), None)
        if isinstance(error, aiomqtt.MqttError):
            reason, code = describe(error)
            raise DeliveryError(self.name, f"publish failed: {reason}", retryable=True, status=code) from error
        if error is not None:
            raise error

    async def _wait_session(self) -> _Session:
        """The live session; waits as long as it takes (the delivery worker decides when to give up)."""
        while True:
            ready = self._ready
            if self._closed or ready is None:
                raise DeliveryError(self.name, "the sink is not running", retryable=True)
            # shield: a cancelled send must not cancel the future other sends are waiting on
            session = await asyncio.shield(ready)
            if session is None:
                raise DeliveryError(self.name, "the sink was closed", retryable=True)
            if not session.ended.done():
                return session

    async def _publish(self, client: aiomqtt.Client, m: _Message) -> None:
        await client.publish(
            m.topic, m.payload, qos=self.config.qos, retain=m.retain, properties=m.properties, timeout=math.inf
        )

    # -- rendering (pure) --------------------------------------------------------------------------------

    def topics(self, event: Event) -> tuple[str, str]:
        """The (event, state) topics of an event; raises a non-retryable DeliveryError for unsafe names."""
        source = level(self.name, "source", event.data.source)
        batch = level(self.name, "batch id", event.batch_id)
        kind = level(self.name, "event type", event.type)
        base = f"{self.config.topic_prefix}/{source}/{batch}"
        event_topic = f"{base}/event/{kind}"
        if len(event_topic.encode()) > _MAX_TOPIC_BYTES:
            raise DeliveryError(self.name, f"topic for batch {event.batch_id!r} is too long for MQTT", retryable=False)
        return event_topic, f"{base}/state"

    def messages(self, event: Event, payload: bytes) -> list[_Message]:
        """What `send` publishes for an event, in order: the event, then the retained state."""
        event_topic, state_topic = self.topics(event)
        if event.type == PRUNED:
            return [_Message(state_topic, b"", retain=True, properties=None)]  # empty retained = cleared
        if self.config.format == "cloudevents":
            body, content_type = encode_cloudevent(event), CLOUDEVENTS_CONTENT_TYPE
        else:
            body, content_type = payload, JSON_CONTENT_TYPE
        expiry = self.config.message_expiry
        event_props = self._properties(event, content_type, expiry)
        # The state message's properties equal the event's unless the event has its own type or expiry.
        same = content_type == JSON_CONTENT_TYPE and expiry is None
        state_props = event_props if same else self._properties(event, JSON_CONTENT_TYPE, None)
        return [
            _Message(event_topic, body, retain=False, properties=event_props),
            _Message(state_topic, state_payload(event), retain=True, properties=state_props),
        ]

    def _properties(self, event: Event, content_type: str, expiry: float | None) -> Properties | None:
        if not self._v5:
            return None
        key = (content_type, expiry)
        template = self._templates.get(key)
        if template is None:
            # The per-sink constants, packed once by paho (which validates each attribute it is given).
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho is untyped
            props.PayloadFormatIndicator = 1  # UTF-8
            props.ContentType = content_type
            if expiry is not None:
                props.MessageExpiryInterval = max(1, math.ceil(expiry))
            template = _unprefixed(props.pack())  # type: ignore[no-untyped-call]
            self._templates[key] = template
        users = (("event_id", event.id), ("event_type", event.type), ("batch_id", event.batch_id))
        return _PackedProperties(template, users)


async def _settled(tasks: Sequence[asyncio.Future[None]], ended: asyncio.Future[None]) -> None:
    """Return once every task is done, one failed, or `ended` resolved (`asyncio.gather` inside
    `asyncio.wait` does the same with one more turn of the event loop per send)."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    remaining = len(tasks)

    def on_done(fut: asyncio.Future[None]) -> None:
        nonlocal remaining
        if fut is not ended:
            remaining -= 1
        if not waiter.done() and (fut is ended or not remaining or fut.cancelled() or fut.exception() is not None):
            waiter.set_result(None)

    watched = (*tasks, ended)
    for fut in watched:
        fut.add_done_callback(on_done)
    try:
        await waiter
    finally:
        for fut in watched:
            fut.remove_done_callback(on_done)


class _PackedProperties(Properties):
    """PUBLISH properties packed once per event: paho calls `pack` for every message and every resend.

    Holds the sink's constant properties (already packed) and the event's user properties; the event
    and its state message share one instance.
    """

    def __init__(self, template: bytes, users: tuple[tuple[str, str], ...]) -> None:
        # No Properties.__init__: it builds paho's name tables per instance, and `pack` needs none of them.
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        body = template + b"".join(b"\x26" + _utf8(k) + _utf8(v) for k, v in users)
        object.__setattr__(self, "UserProperty", list(users))  # readable as paho's, without its per-set scan
        object.__setattr__(self, "_packed", _varint(len(body)) + body)

    def pack(self) -> bytes:
        packed: bytes = self.__dict__["_packed"]
        return packed


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _varint(value: int) -> bytes:
    """MQTT's Variable Byte Integer."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _unprefixed(packed: bytes) -> bytes:
    """Packed properties without their leading length."""
    start = 0
    while packed[start] & 0x80:
        start += 1
    return packed[start + 1 :]
