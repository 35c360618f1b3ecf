"""The webhook sink against real aiohttp servers on loopback, alone and driven by the real delivery worker.

Every delivery is checked with OpenAI's SDK (`client.webhooks.unwrap`) and with the standardwebhooks
reference library, so what we sign is what consumers verify.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
import standardwebhooks
from aiohttp import web
from pydantic import ValidationError
from structlog.testing import capture_logs

import poller
from poller import signing
from poller.config import WebhookSinkConfig
from poller.delivery.worker import DeliveryWorker
from poller.domain.events import Event, cloudevent, encode
from poller.errors import ConfigError, DeliveryError
from poller.metrics import Metrics
from poller.sinks import alerts
from poller.sinks.webhook import WebhookSink, classify
from poller.store import open_store
from poller.store.base import NewEvent, Store, TrackedBatch, Write
from tests.helpers import posts_to, status_event


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


SECRET_NEW = new_secret()
SECRET_OLD = new_secret()
STRANGER = new_secret()
ROUTING_KEY = "R" + os.urandom(16).hex()
ENV = {"WH_NEW": SECRET_NEW, "WH_OLD": SECRET_OLD, "PD_KEY": ROUTING_KEY}
FAST = [0.05, 0.05, 0.05]


# -- a real HTTP endpoint ---------------------------------------------------------------------------

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    arrived: float  # wall clock, the same clock the delivery worker schedules with
    headers: dict[str, str]
    body: bytes
    answered: float | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Endpoint:
    """Answers each POST with the next scripted reply (a status, or a coroutine function), then `default`."""

    url: str = ""
    script: list[int | Reply] = field(default_factory=list)
    default: int | Reply = 200
    requests: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(time.time(), dict(request.headers.items()), await request.read())
        self.requests.append(received)
        async with self.arrived:
            self.arrived.notify_all()
        reply = self.script.pop(0) if self.script else self.default
        try:
            if isinstance(reply, int):
                return web.Response(status=reply, text="ok" if reply < 300 else f"status {reply}")
            return await reply(request)
        finally:
            received.answered = time.time()

    async def hang(self, request: web.Request) -> web.StreamResponse:
        """Accept the request and never answer (until the test ends)."""
        await self.release.wait()
        return web.Response(status=200)

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.requests) >= count), timeout)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint()
    async with posts_to(ep.handle) as address:
        ep.url = f"http://{address}/hooks/batch"
        yield ep
        ep.release.set()


# -- events, config, worker -------------------------------------------------------------------------

SOURCE = "openai"


make = status_event


def config(url: str, **kwargs: Any) -> WebhookSinkConfig:
    raw: dict[str, Any] = {"kind": "webhook", "url": url, "secret_env": ["WH_NEW", "WH_OLD"], "retry_schedule": FAST}
    return WebhookSinkConfig.model_validate(raw | kwargs)


def sink(url: str, **kwargs: Any) -> WebhookSink:
    return WebhookSink("hook", config(url, **kwargs), environ=ENV)


async def enqueue(store: Store, sink_name: str, events: list[Event]) -> None:
    now = time.time()
    by_batch: dict[str, list[Event]] = {}
    for ev in events:
        by_batch.setdefault(ev.batch_id, []).append(ev)
    writes = []
    for batch_id, evs in by_batch.items():
        await store.track(SOURCE, [batch_id], "test", now)
        rows = [
            NewEvent(ev.id, ev.type, ev.data.sequence, ev.created_at, ev.data.detected_at, encode(ev), [sink_name])
            for ev in evs
        ]
        writes.append(Write(TrackedBatch(SOURCE, batch_id, "test", now), rows))
    await store.record(writes, now)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(tmp_path / "state.db") as s:
        yield s


class Running:
    """A delivery worker running in the background for one sink."""

    def __init__(self, store: Store, webhook: WebhookSink) -> None:
        self.worker = DeliveryWorker(store, webhook, Metrics(), rand=lambda: 0.5)  # no jitter: exact schedule
        self.task = asyncio.create_task(self.worker.run(), name="test.delivery")

    async def stop(self) -> None:
        await self.worker.stop(1.0)
        await asyncio.wait_for(self.task, 5.0)


async def until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await _value(predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _value(result: bool | Awaitable[bool]) -> bool:
    return await result if inspect.isawaitable(result) else bool(result)


async def states(store: Store) -> dict[str, str]:
    rows = await store.deliveries("hook", states=("pending", "dead", "delivered"))
    return {row.event_id: row.state for row in rows}


async def states_are(store: Store, expected: dict[str, str]) -> bool:
    return await states(store) == expected


# -- verification as consumers do it ----------------------------------------------------------------


def verify(received: Received, secret: str) -> Any:
    """Verify with both libraries (raising if either refuses); returns the parsed body."""
    client = openai.OpenAI(api_key="x", webhook_secret=secret)
    parsed = standardwebhooks.Webhook(secret).verify(received.body, received.headers)
    if isinstance(parsed, dict):
        assert client.webhooks.unwrap(received.body, received.headers).type == parsed["type"]
    else:  # unwrap parses into OpenAI's event types; an Alertmanager list is only verified
        client.webhooks.verify_signature(received.body, received.headers)
    return parsed


def rejects(received: Received, secret: str) -> bool:
    client = openai.OpenAI(api_key="x", webhook_secret=secret)
    try:
        client.webhooks.verify_signature(received.body, received.headers)
    except openai.InvalidWebhookSignatureError:
        pass
    else:
        return False
    try:
        standardwebhooks.Webhook(secret).verify(received.body, received.headers)
    except standardwebhooks.WebhookVerificationError:
        return True
    return False


# -- signing ----------------------------------------------------------------------------------------


def test_signature_matches_the_reference_library() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"type":"batch.completed"}'
    expected = standardwebhooks.Webhook(secret).sign("evt_1", datetime.fromtimestamp(1674087231, UTC), body.decode())
    assert signing.sign([secret], "evt_1", 1674087231, body) == expected
    assert signing.sign([secret, SECRET_OLD], "evt_1", 1674087231, body).split(" ")[0] == expected


@pytest.mark.parametrize(
    ("secret", "problem"),
    [("abc", "must start with 'whsec_'"), ("whsec_", "empty"), ("whsec_not base64!", "not base64")],
)
def test_malformed_secrets_are_rejected_without_showing_them(secret: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        signing.secret_key(secret)
    assert secret not in str(info.value) or secret == "whsec_"


def test_unpadded_secret_is_accepted_like_standardwebhooks_does() -> None:
    padded = "whsec_" + base64.b64encode(b"0123456789abcdefghijklmnop").decode()  # 26 bytes: one "="
    assert padded.endswith("=")
    assert signing.secret_key(padded.rstrip("=")) == signing.secret_key(padded)


def test_message_ids_with_dots_are_refused() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        signing.sign([SECRET_NEW], "evt.1", 1, b"{}")


def test_sink_reports_a_malformed_secret_as_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        WebhookSink("hook", config("http://127.0.0.1:9/x", secret_env="BAD"), environ={"BAD": "whsec_?!"})
    assert info.value.key == "sinks.hook.secret"
    assert "whsec_?!" not in info.value.render()


def test_configured_headers_may_not_replace_the_signature_headers() -> None:
    with pytest.raises(ValidationError, match=r"(?i)webhook-signature"):
        sink("http://127.0.0.1:9/x", headers={"Webhook-Signature": "v1,forged"})


# -- classification ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable", "disable", "retry_after"),
    [
        (200, None, False, None),
        (202, None, False, None),
        (204, None, False, None),
        (301, True, False, None),
        (302, True, False, None),
        (400, False, False, None),
        (401, False, False, None),
        (404, False, False, None),
        (408, True, False, None),
        (410, False, True, None),
        (413, False, False, None),
        (429, True, False, 7.0),
        (500, True, False, None),
        (502, True, False, None),
        (503, True, False, 7.0),
        (504, True, False, None),
        (None, True, False, None),
    ],
)
def test_classify(status: int | None, retryable: bool | None, disable: bool, retry_after: float | None) -> None:
    error = classify("hook", status, "body", retry_after=7.0)
    if retryable is None:
        assert error is None
        return
    assert error is not None
    assert (error.retryable, error.disable, error.status, error.retry_after) == (
        retryable,
        disable,
        status,
        retry_after,
    )


def test_classify_caps_an_absurd_retry_after() -> None:
    error = classify("hook", 429, "", retry_after=10 * 86400.0)
    assert error is not None
    assert error.retry_after == 86400.0


# -- what goes over the wire ------------------------------------------------------------------------


async def test_openai_format_sends_the_payload_bytes_signed_for_both_secrets(endpoint: Endpoint) -> None:
    ev = make("batch_1", "batch.completed", 3, previous="finalizing")
    payload = encode(ev)
    async with sink(endpoint.url, headers={"X-Team": "ml"}) as webhook:
        await webhook.send(ev, payload)
        assert webhook.health() == "ok"
    [got] = endpoint.requests
    assert got.body == payload
    h = {k.lower(): v for k, v in got.headers.items()}
    assert h["webhook-id"] == ev.id
    assert abs(int(h["webhook-timestamp"]) - time.time()) < 5
    assert len(h["webhook-signature"].split(" ")) == 2
    assert h["content-type"] == "application/json"
    assert h["user-agent"] == f"batch-poller/{poller.__version__}"
    assert h["x-team"] == "ml"
    # Rotation: a consumer that knows only the new, or only the old secret accepts; a stranger does not.
    assert verify(got, SECRET_NEW)["id"] == ev.id
    assert verify(got, SECRET_OLD)["id"] == ev.id
    assert rejects(got, STRANGER)
    unwrapped = openai.OpenAI(api_key="x", webhook_secret=SECRET_OLD).webhooks.unwrap(got.body, got.headers)
    assert unwrapped.type == "batch.completed"
    assert unwrapped.data.id == "batch_1"


async def test_cloudevents_format(endpoint: Endpoint) -> None:
    ev = make("batch_1", "batch.failed", 2, previous="validating")
    async with sink(endpoint.url, format="cloudevents") as webhook:
        await webhook.send(ev, encode(ev))
    [got] = endpoint.requests
    assert got.headers["Content-Type"] == "application/cloudevents+json"
    assert verify(got, SECRET_NEW) == cloudevent(ev)


async def test_alert_format_sends_its_rendering_and_skips_events_it_ignores(endpoint: Endpoint) -> None:
    failed = make("batch_1", "batch.failed", 2, previous="validating")
    running = make("batch_2", "batch.in_progress", 2, previous="validating")
    cfg = {"format": "pagerduty", "routing_key_env": "PD_KEY", "secret_env": None, "links": "https://x.test/{batch_id}"}
    async with sink(endpoint.url, **cfg) as webhook:
        await webhook.send(running, encode(running))  # nothing for PagerDuty: acknowledged without a request
        assert endpoint.requests == []
        await webhook.send(failed, encode(failed))
    [got] = endpoint.requests
    assert got.json == alerts.pagerduty(failed, ROUTING_KEY, links="https://x.test/{batch_id}")
    assert "webhook-signature" not in {k.lower() for k in got.headers}  # no secrets configured
    assert got.headers["webhook-id"] == failed.id


async def test_alertmanager_body_is_signed_as_sent(endpoint: Endpoint) -> None:
    ev = make("batch_1", "batch.stalled", 5, previous="in_progress", status="in_progress")
    async with sink(endpoint.url, format="alertmanager") as webhook:
        await webhook.send(ev, encode(ev))
    [got] = endpoint.requests
    body = verify(got, SECRET_NEW)
    assert [a["labels"]["alertname"] for a in body] == ["BatchStalled"]


async def test_redirects_are_not_followed(endpoint: Endpoint) -> None:
    async def redirect(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(endpoint.url + "/elsewhere")

    endpoint.script = [redirect]
    ev = make("batch_1", "batch.completed", 3)
    async with sink(endpoint.url) as webhook:
        with pytest.raises(DeliveryError) as info:
            await webhook.send(ev, encode(ev))
        assert webhook.health() == "failing"
    assert info.value.status == 302
    assert info.value.retryable
    assert len(endpoint.requests) == 1


async def test_response_bodies_are_read_only_up_to_64k_and_quoted_briefly(endpoint: Endpoint) -> None:
    async def huge(_: web.Request) -> web.StreamResponse:
        return web.Response(status=500, body=b"x" * (4 * 1024 * 1024))

    endpoint.script = [huge]
    ev = make("batch_1", "batch.completed", 3)
    async with sink(endpoint.url) as webhook:
        with pytest.raises(DeliveryError) as info:
            await webhook.send(ev, encode(ev))
    assert info.value.status == 500
    assert len(str(info.value)) < 300


async def test_connection_refused_is_retryable() -> None:
    ev = make("batch_1", "batch.completed", 3)
    async with sink("http://127.0.0.1:9/hook") as webhook:  # port 9 (discard) is closed on loopback
        with pytest.raises(DeliveryError) as info:
            await webhook.send(ev, encode(ev))
    assert info.value.retryable
    assert info.value.status is None


async def test_send_after_410_does_not_call_again(endpoint: Endpoint) -> None:
    endpoint.script = [410]
    ev = make("batch_1", "batch.completed", 3)
    async with sink(endpoint.url) as webhook:
        for _ in range(2):
            with pytest.raises(DeliveryError) as info:
                await webhook.send(ev, encode(ev))
            assert info.value.disable
        assert webhook.health() == "disabled"
    assert len(endpoint.requests) == 1


# -- through the delivery worker --------------------------------------------------------------------


async def test_500_twice_then_delivered_with_the_same_webhook_id(endpoint: Endpoint, store: Store) -> None:
    endpoint.script = [500, 500]
    ev = make("batch_1", "batch.completed", 3)
    await enqueue(store, "hook", [ev])
    async with sink(endpoint.url) as webhook:
        running = Running(store, webhook)
        await until(lambda: states_are(store, {ev.id: "delivered"}))
        await running.stop()
        assert webhook.health() == "ok"
    assert len(endpoint.requests) == 3
    assert {r.headers["webhook-id"] for r in endpoint.requests} == {ev.id}
    for received in endpoint.requests:
        assert received.body == encode(ev)
        verify(received, SECRET_NEW)
        verify(received, SECRET_OLD)


async def test_429_retry_after_is_a_floor_for_the_next_attempt(endpoint: Endpoint, store: Store) -> None:
    async def slow_down(_: web.Request) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "2"}, text="slow down")

    endpoint.script = [slow_down]
    ev = make("batch_1", "batch.completed", 3)
    await enqueue(store, "hook", [ev])
    async with sink(endpoint.url) as webhook:
        running = Running(store, webhook)
        await until(lambda: states_are(store, {ev.id: "delivered"}))
        await running.stop()
    first, second = endpoint.requests
    assert second.arrived - first.arrived >= 2.0  # the schedule alone would have retried after 0.05 s


async def test_410_disables_the_sink_and_stops_attempts(endpoint: Endpoint, store: Store) -> None:
    endpoint.default = 410
    one, two = make("batch_1", "batch.completed", 3), make("batch_2", "batch.completed", 3)
    await enqueue(store, "hook", [one])
    async with sink(endpoint.url) as webhook:
        running = Running(store, webhook)
        await until(lambda: running.worker.disabled)
        await enqueue(store, "hook", [two])
        running.worker.wake()
        await asyncio.sleep(0.5)
        await running.stop()
        assert webhook.health() == "disabled"
    assert len(endpoint.requests) == 1
    assert await states(store) == {one.id: "pending", two.id: "pending"}  # kept for when someone re-enables it


async def test_400_dead_letters_then_redelivers_once_accepted(endpoint: Endpoint, store: Store) -> None:
    endpoint.script = [400]
    ev = make("batch_1", "batch.completed", 3)
    await enqueue(store, "hook", [ev])
    async with sink(endpoint.url) as webhook:
        running = Running(store, webhook)
        await until(lambda: states_are(store, {ev.id: "dead"}))
        [dead] = await store.deliveries("hook", states=("dead",))
        assert dead.last_error is not None
        assert "HTTP 400" in dead.last_error
        assert len(endpoint.requests) == 1
        assert await store.redeliver("hook", None, time.time()) == 1
        running.worker.wake()
        await until(lambda: states_are(store, {ev.id: "delivered"}))
        await running.stop()
    assert len(endpoint.requests) == 2
    verify(endpoint.requests[1], SECRET_NEW)


async def test_an_endpoint_that_never_answers_is_abandoned_at_the_timeout(endpoint: Endpoint, store: Store) -> None:
    endpoint.script = [endpoint.hang]
    ev = make("batch_1", "batch.completed", 3)
    await enqueue(store, "hook", [ev])
    async with sink(endpoint.url, timeout=0.3) as webhook:
        running = Running(store, webhook)
        await until(lambda: states_are(store, {ev.id: "delivered"}))
        await running.stop()
    first, second = endpoint.requests
    assert first.answered is None  # still hanging when the retry arrived
    assert 0.3 <= second.arrived - first.arrived < 5.0
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == ev.id
    verify(second, SECRET_NEW)


async def test_timeout_error_names_the_limit(endpoint: Endpoint) -> None:
    endpoint.script = [endpoint.hang]
    ev = make("batch_1", "batch.completed", 3)
    async with sink(endpoint.url, timeout=0.3) as webhook:
        started = time.monotonic()
        with pytest.raises(DeliveryError, match=r"no response within 0\.3s") as info:
            await webhook.send(ev, encode(ev))
        assert 0.25 <= time.monotonic() - started < 3.0
    assert info.value.retryable


async def test_one_batch_stays_in_order_while_another_proceeds(endpoint: Endpoint, store: Store) -> None:
    async def slow_first_status(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if body["type"] == "batch.in_progress" and body["data"]["id"] == "batch_slow":
            await asyncio.sleep(0.5)
        return web.Response(status=200)

    endpoint.default = slow_first_status
    slow = [make("batch_slow", "batch.in_progress", 1), make("batch_slow", "batch.completed", 2)]
    fast = [make("batch_fast", "batch.in_progress", 1)]
    await enqueue(store, "hook", slow)
    await enqueue(store, "hook", fast)
    async with sink(endpoint.url, max_concurrency=4) as webhook:
        running = Running(store, webhook)

        async def all_three_delivered() -> bool:
            got = await states(store)
            return set(got.values()) == {"delivered"} and len(got) == 3

        await until(all_three_delivered)
        await running.stop()
    seen = [(r.json["data"]["id"], r.json["type"], r) for r in endpoint.requests]
    slow_seen = [(t, r) for b, t, r in seen if b == "batch_slow"]
    assert [t for t, _ in slow_seen] == ["batch.in_progress", "batch.completed"]
    (_, in_progress), (_, completed) = slow_seen
    assert in_progress.answered is not None
    assert completed.arrived >= in_progress.answered  # the next event waited for the acknowledgement
    [fast_req] = [r for b, _, r in seen if b == "batch_fast"]
    assert fast_req.arrived < in_progress.answered  # the other batch was not held up


# -- secrets stay secret ----------------------------------------------------------------------------


async def test_no_secret_reaches_logs_or_errors(endpoint: Endpoint, store: Store) -> None:
    async def echo_everything(request: web.Request) -> web.StreamResponse:
        # A misbehaving receiver (or proxy) that echoes the request, and even our secrets, in its error.
        text = await request.text() + json.dumps(dict(request.headers)) + SECRET_NEW + SECRET_OLD
        return web.Response(status=400, text=text)

    endpoint.default = echo_everything
    ev = make("batch_1", "batch.failed", 2, previous="validating")
    await enqueue(store, "hook", [ev])
    cfg = {"format": "pagerduty", "routing_key_env": "PD_KEY"}
    with capture_logs() as logs:
        async with sink(endpoint.url, **cfg) as webhook:
            with pytest.raises(DeliveryError) as info:
                await webhook.send(ev, encode(ev))
            running = Running(store, webhook)
            await until(lambda: states_are(store, {ev.id: "dead"}))
            await running.stop()
    assert logs, "the dead letter is logged"
    texts = [str(info.value), repr(logs), *(d.last_error or "" for d in await store.deliveries("hook"))]
    for text in texts:
        for secret in (SECRET_NEW, SECRET_OLD, ROUTING_KEY, SECRET_NEW.removeprefix("whsec_")):
            assert secret not in text
    assert "HTTP 400" in str(info.value)
