"""The apprise sink through Apprise's real ``json://`` target to an aiohttp server on loopback: alone,
driven by the real delivery worker, and inside a running daemon."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from poller.cli import main
from poller.config import parse_config
from poller.config.sinks import AppriseSinkConfig
from poller.delivery.worker import DeliveryWorker
from poller.domain.events import Event, encode
from poller.errors import ConfigError, DeliveryError
from poller.metrics import Metrics
from poller.sim import serve
from poller.sinks.apprise import AppriseSink, clean, render, split_urls
from poller.store import open_store
from poller.store.base import NewEvent, Store, TrackedBatch, Write
from tests.helpers import (
    FINAL,
    KEY,
    KEY_ENV,
    config_dict,
    eventually,
    fast_sim,
    make_config,
    posts_to,
    running,
    status_event,
    write_toml,
)

SOURCE = "openai"
FAST = [0.05, 0.05, 0.05]
TOKEN = "tok3n-5ecret-abcdef"


@dataclass
class Endpoint:
    """Answers each POST with the next scripted status, then 200; keeps every JSON body per path."""

    base: str = ""
    script: dict[str, list[int]] = field(default_factory=dict)
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.setdefault(request.path, []).append(json.loads(await request.read()))
        statuses = self.script.get(request.path)
        status = statuses.pop(0) if statuses else 200
        return web.Response(status=status, text=f"status {status}")

    def url(self, path: str) -> str:
        return f"json://{self.base}{path}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return self.received.get(path, [])


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint()
    async with posts_to(ep.handle) as address:
        ep.base = address
        yield ep


def make(batch_id: str, event_type: str, sequence: int, *, previous: str | None = None, **extra: Any) -> Event:
    return status_event(
        batch_id,
        event_type,
        sequence,
        previous=previous,
        **({"request_counts": {"completed": 8, "failed": 2, "total": 12}} | extra),
    )


def sink(*urls: str, **kwargs: Any) -> AppriseSink:
    raw: dict[str, Any] = {"kind": "apprise", "urls_env": "APPRISE_URLS", "retry_schedule": FAST}
    config = AppriseSinkConfig.model_validate(raw | kwargs)
    return AppriseSink("notify", config, environ={"APPRISE_URLS": "\n".join(urls)})


async def enqueue(store: Store, sink_name: str, events: list[Event]) -> None:
    now = time.time()
    for ev in events:
        await store.track(SOURCE, [ev.batch_id], "test", now)
        row = NewEvent(ev.id, ev.type, ev.data.sequence, ev.created_at, ev.data.detected_at, encode(ev), [sink_name])
        await store.record([Write(TrackedBatch(SOURCE, ev.batch_id, "test", now), [row])], now)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(tmp_path / "state.db") as s:
        yield s


async def delivered(store: Store, sink_name: str, event_id: str) -> bool:
    rows = await store.deliveries(sink_name, states=("delivered",))
    return any(r.event_id == event_id for r in rows)


async def until_delivered(store: Store, sink_name: str, event_id: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await delivered(store, sink_name, event_id):
        assert time.monotonic() < deadline, "not delivered in time"
        await asyncio.sleep(0.02)


# -- rendering ----------------------------------------------------------------------------------------


def test_message_says_what_happened_to_which_batch() -> None:
    ev = make("batch_1", "batch.completed", 3, previous="finalizing")
    message = render(ev, links="https://platform.example/batches/{batch_id}")
    assert message is not None
    assert message.title == "Batch completed: batch_1 on openai"
    assert message.notify_type == "success"
    lines = message.body.splitlines()
    assert "Batch: batch_1" in lines
    assert "Source: openai (openai)" in lines
    assert "Status: finalizing → completed" in lines
    assert "Requests: 10/12 done (8 completed, 2 failed)" in lines
    assert "Endpoint: /v1/chat/completions" in lines
    assert "Metadata: team=ml" in lines
    assert "Link: https://platform.example/batches/batch_1" in lines
    assert lines[-1].startswith(f"Event: batch.completed {ev.id} at ")


@pytest.mark.parametrize(
    ("event_type", "kind"),
    [("batch.failed", "failure"), ("batch.expired", "failure"), ("batch.stalled", "warning"),
     ("batch.in_progress", "info"), ("batch.progress", "info")],
)  # fmt: skip
def test_notification_type_follows_the_event(event_type: str, kind: str) -> None:
    message = render(make("batch_1", event_type, 2))
    assert message is not None
    assert message.notify_type == kind


def test_failed_batch_shows_its_errors() -> None:
    errors = {"object": "list", "data": [{"code": "invalid_json", "message": "bad line\n# Heading", "line": 4}]}
    message = render(make("batch_1", "batch.failed", 2, previous="validating", errors=errors))
    assert message is not None
    assert "- invalid_json: bad line # Heading (line 4)" in message.body.splitlines()


def test_outside_fields_cannot_add_lines_or_control_characters() -> None:
    metadata = {"team\n\nStatus: completed": "a\u202eb\x1b[31m\r\nLink: http://evil", "long": "x" * 500}
    message = render(make("batch_1", "batch.failed", 2, metadata=metadata))
    assert message is not None
    metadata_lines = [line for line in message.body.splitlines() if line.startswith("Metadata:")]
    assert len(metadata_lines) == 1
    assert not any(line.startswith("Link:") for line in message.body.splitlines())
    assert "\x1b" not in message.body
    assert "\u202e" not in message.body
    assert "x" * 101 not in message.body
    assert clean("a\tb\n\nc\x00d") == "a b c d"


def test_internal_events_send_nothing() -> None:
    assert render(make("batch_1", "batch.pruned", 9)) is None


def test_urls_split_by_line_space_and_comma_with_comments() -> None:
    text = "# ops\njson://a/b, json://c/d\n\n  ntfy://topic  \n"
    assert split_urls(text) == ["json://a/b", "json://c/d", "ntfy://topic"]


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["urls", "url"])
def test_inline_urls_are_refused_naming_the_key_and_the_fix(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sinks": [{"kind": "apprise", key: [f"discord://{TOKEN}"]}]})
    assert info.value.key == f"sinks[0].{key}"
    message = info.value.render()
    assert "inline Apprise URLs are refused" in message
    assert f"fix: remove {key}; " in message
    assert "urls_env" in message
    assert "urls_file" in message
    assert TOKEN not in message


def test_inline_urls_exit_78(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    raw = config_dict("http://127.0.0.1:9/v1", tmp_path / "state.db", [{"kind": "apprise", "urls": f"ntfy://{TOKEN}"}])
    assert main(["check-config", "--config", str(write_toml(tmp_path / "config.toml", raw))]) == 78
    err = capsys.readouterr().err
    assert "sinks[0].urls: inline Apprise URLs are refused" in err
    assert "fix:" in err
    assert TOKEN not in err


def test_a_urls_source_is_required() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sinks": [{"kind": "apprise"}]})
    assert "urls_env or urls_file" in info.value.render()


def test_a_url_apprise_cannot_use_is_a_config_error_without_the_url() -> None:
    with pytest.raises(ConfigError) as info:
        sink("json://127.0.0.1:9/ok", f"nosuchservice://{TOKEN}")
    assert info.value.key == "sinks.notify.urls_env"
    assert "entry 2 of 2" in info.value.problem
    assert TOKEN not in info.value.render()


def test_urls_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "apprise-urls"
    path.write_text("# team channel\njson://127.0.0.1:9/a\njson://127.0.0.1:9/b\n", encoding="utf-8")
    config = AppriseSinkConfig.model_validate({"kind": "apprise", "urls_file": str(path)})
    assert AppriseSink("notify", config, environ={}).services == 2
    path.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        AppriseSink("notify", config, environ={})
    assert info.value.key == "sinks.notify.urls_file"


# -- delivery -----------------------------------------------------------------------------------------


async def test_the_event_arrives_with_its_title_and_body(endpoint: Endpoint) -> None:
    ev = make("batch_1", "batch.completed", 3, previous="finalizing")
    async with sink(endpoint.url("/hook")) as notify:
        await notify.send(ev, encode(ev))
    (received,) = endpoint.bodies("/hook")
    expected = render(ev)
    assert expected is not None
    assert received["title"] == expected.title
    assert received["message"] == expected.body
    assert received["type"] == "success"


async def test_a_500_is_retried_then_delivered(endpoint: Endpoint, store: Store) -> None:
    endpoint.script["/hook"] = [500]
    ev = make("batch_1", "batch.failed", 2, previous="in_progress")
    await enqueue(store, "notify", [ev])
    async with sink(endpoint.url("/hook")) as notify:
        worker = DeliveryWorker(store, notify, Metrics(), rand=lambda: 0.5)
        task = asyncio.create_task(worker.run(), name="test.delivery")
        await until_delivered(store, "notify", ev.id)
        await worker.stop(1.0)
        await asyncio.wait_for(task, 5.0)
        assert notify.health() == "ok"
    bodies = endpoint.bodies("/hook")
    assert len(bodies) == 2
    assert bodies[0] == bodies[1]


async def test_a_retry_skips_the_services_that_accepted(endpoint: Endpoint) -> None:
    endpoint.script["/down"] = [500]
    ev = make("batch_1", "batch.expired", 4)
    async with sink(endpoint.url("/up"), endpoint.url("/down")) as notify:
        with pytest.raises(DeliveryError) as info:
            await notify.send(ev, encode(ev))
        assert info.value.retryable
        assert "1 of 2 services failed" in str(info.value)
        assert notify.health() == "failing"
        await notify.send(ev, encode(ev))
        assert notify.health() == "ok"
    assert len(endpoint.bodies("/up")) == 1
    assert len(endpoint.bodies("/down")) == 2


async def test_an_unreachable_service_is_retryable() -> None:
    ev = make("batch_1", "batch.completed", 3)
    async with sink("json://127.0.0.1:9/nothing", timeout="5s") as notify:
        with pytest.raises(DeliveryError) as info:
            await notify.send(ev, encode(ev))
    assert info.value.retryable


async def test_no_url_part_reaches_errors_or_logs(endpoint: Endpoint, store: Store) -> None:
    path = f"/{TOKEN}"
    endpoint.script[path] = [500, 500]
    ev = make("batch_1", "batch.completed", 3)
    await enqueue(store, "notify", [ev])
    url = f"json://user:{TOKEN}@{endpoint.base}{path}?apikey={TOKEN}"
    errors: list[str] = []
    with capture_logs() as logs:
        async with sink(url) as notify:
            try:
                await notify.send(ev, encode(ev))
            except DeliveryError as exc:
                errors.append(str(exc))
            worker = DeliveryWorker(store, notify, Metrics(), rand=lambda: 0.5)
            task = asyncio.create_task(worker.run(), name="test.delivery")
            await until_delivered(store, "notify", ev.id)
            await worker.stop(1.0)
            await asyncio.wait_for(task, 5.0)
    assert errors
    assert all(TOKEN not in e for e in errors)
    assert TOKEN not in repr(logs)
    rows = await store.deliveries("notify", states=("delivered",))
    assert all(TOKEN not in repr(r) for r in rows)


# -- through a running daemon -------------------------------------------------------------------------


async def test_a_daemon_notifies_each_final_transition_through_the_outbox(tmp_path: Path, endpoint: Endpoint) -> None:
    sim = fast_sim()
    async with serve(sim) as url:
        ids = sim.create_batches(3)
        final = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]
        sinks = [{"kind": "apprise", "urls_env": "APPRISE_URLS", "events": final, "retry_schedule": ["0.1s"] * 5}]
        raw = config_dict(url, tmp_path / "state.db", sinks)
        raw["source"]["track"] = ids
        endpoint.script["/daemon"] = [500]  # the first notification fails once: the outbox retries it
        async with running(make_config(raw), environ={"APPRISE_URLS": endpoint.url("/daemon")}):
            await eventually(lambda: all(sim.get(i)["status"] in FINAL for i in ids), timeout=60)
            await eventually(lambda: len({b["title"] for b in endpoint.bodies("/daemon")}) == len(ids), timeout=30)
    titles = {b["title"] for b in endpoint.bodies("/daemon")}
    for batch_id in ids:
        status = sim.get(batch_id)["status"]
        assert any(t.endswith(f": {batch_id} on openai") and status in t for t in titles), (batch_id, titles)
    assert len(endpoint.bodies("/daemon")) == len(ids) + 1
