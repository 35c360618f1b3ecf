"""Anthropic Message Batches: the simulator as the official `anthropic` SDK sees it, the adapter against the
simulator, and a daemon discovering and following batches through their whole lifecycle.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic._constants import ANTHROPIC_API_VERSION

from poller.config.sources import AnthropicSourceConfig
from poller.domain.schedule import Pacer
from poller.domain.snapshot import Counts
from poller.errors import ApiError, BadResponseError
from poller.metrics import Metrics
from poller.providers.anthropic import AnthropicProvider
from poller.sim import Fault, ManualClock, SimClock, SimProfile, serve
from poller.sim.anthropic import WINDOW, AnthropicSim, rfc3339
from tests.helpers import FAST_PROFILE, FINAL, KEY, KEY_ENV, config_dict, eventually, make_config, read_jsonl, running

START = 1_750_000_000.0
#: Fixed durations so a lifecycle can be checked second by second.
FIXED = SimProfile(
    validating_s=(10, 10),
    in_progress_s=(1_000, 1_000),
    finalizing_s=(50, 50),
    cancelling_s=(30, 30),
    p_failed=0.0,
    p_expired=0.0,
    requests=(100, 100),
    request_failure_rate=(0.1, 0.1),
)
REQUEST: Any = {
    "custom_id": "r-1",
    "params": {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]},
}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=START)


@pytest.fixture
def sim(clock: ManualClock) -> AnthropicSim:
    return AnthropicSim(clock=clock, profile=FIXED, seed=3)


@pytest.fixture
async def base_url(sim: AnthropicSim) -> AsyncIterator[str]:
    async with serve(sim) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(api_key=KEY, base_url=base_url, max_retries=0) as c:
        yield c


def make_adapter(base_url: str = "http://127.0.0.1:9", **config: Any) -> AnthropicProvider:
    source = AnthropicSourceConfig(provider="anthropic", base_url=base_url, **config)
    return AnthropicProvider(source, KEY, metrics=Metrics().source("anthropic"), pacer=Pacer(100.0))


@pytest.fixture
async def adapter(base_url: str) -> AsyncIterator[AnthropicProvider]:
    async with make_adapter(base_url) as api:
        yield api


# -- the SDK's view ------------------------------------------------------------------------------------


async def test_sdk_creates_and_retrieves(client: anthropic.AsyncAnthropic, sim: AnthropicSim) -> None:
    created = await client.messages.batches.create(requests=[REQUEST, REQUEST | {"custom_id": "r-2"}])
    assert created.id.startswith("msgbatch_")
    assert created.processing_status == "in_progress"
    assert created.created_at.timestamp() == START
    assert created.expires_at.timestamp() == START + WINDOW
    assert created.request_counts.processing == 2
    assert created.ended_at is None
    assert created.results_url is None

    raw = await client.messages.batches.with_raw_response.retrieve(created.id)
    assert raw.headers["request-id"].startswith("req_")
    assert (await raw.parse()).model_dump() == created.model_dump()
    assert (sim.stats.create, sim.stats.retrieve) == (1, 1)

    refused: list[Any] = [
        [],
        [REQUEST, REQUEST],
        [REQUEST | {"custom_id": "bad id!"}],
        [{"custom_id": "x", "params": {}}],
    ]
    for bad in refused:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.batches.create(requests=bad)
        assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


async def test_sdk_auto_pagination_walks_every_page_newest_first(
    client: anthropic.AsyncAnthropic, sim: AnthropicSim, clock: ManualClock
) -> None:
    ids = sim.create_batches(23)
    clock.advance(5)
    ids += sim.create_batches(14, spread=3_600)  # backdated: they sort among the older ones
    clock.advance(5)
    ids += sim.create_batches(8)
    position = {batch_id: i for i, batch_id in enumerate(ids)}
    expected = sorted(ids, key=lambda i: (sim.record(i).created_at, position[i]), reverse=True)

    sim.stats.reset()
    seen = [b.id async for b in client.messages.batches.list(limit=10)]
    assert seen == expected
    assert sim.stats.list == math.ceil(len(ids) / 10)

    newer = [b.id async for b in client.messages.batches.list(before_id=expected[20], limit=6)]
    assert sorted(newer) == sorted(expected[:20])

    page = await client.messages.batches.list(limit=3)
    assert (page.first_id, page.last_id, page.has_more) == (expected[0], expected[2], True)
    for bad in (0, 1001):
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.batches.list(limit=bad)


async def test_sdk_cancel_goes_canceling_then_ended_with_canceled_counts(
    client: anthropic.AsyncAnthropic, clock: ManualClock
) -> None:
    batch = await client.messages.batches.create(requests=[REQUEST | {"custom_id": f"r{i}"} for i in range(40)])
    clock.advance(10 + 500)  # half way through processing
    canceling = await client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert canceling.cancel_initiated_at.timestamp() == clock.now()
    assert canceling.request_counts.processing == 40  # nothing moves before the end

    clock.advance(30)
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.ended_at is not None
    assert ended.ended_at.timestamp() == canceling.cancel_initiated_at.timestamp() + 30
    counts = ended.request_counts
    assert counts.processing == 0
    assert counts.succeeded + counts.errored == 20
    assert counts.canceled == 20
    assert ended.results_url is not None
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.batches.cancel(batch.id)


async def test_sdk_sees_counts_move_only_when_the_batch_ends(
    client: anthropic.AsyncAnthropic, clock: ManualClock
) -> None:
    batch = await client.messages.batches.create(requests=[REQUEST | {"custom_id": f"r{i}"} for i in range(100)])
    statuses: list[str] = []
    last: Any = batch
    for _ in range(60):
        last = await client.messages.batches.retrieve(batch.id)
        if not statuses or statuses[-1] != last.processing_status:
            statuses.append(last.processing_status)
        if last.processing_status == "ended":
            break
        assert last.request_counts.processing == 100
        assert last.request_counts.succeeded == last.request_counts.errored == 0
        clock.advance(25)
    assert statuses == ["in_progress", "ended"]
    assert last.ended_at.timestamp() == START + 10 + 1_000 + 50
    assert (last.request_counts.succeeded, last.request_counts.errored) == (90, 10)


async def test_sdk_errors_in_anthropic_shape(
    client: anthropic.AsyncAnthropic, base_url: str, sim: AnthropicSim
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.batches.retrieve("msgbatch_missing")
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    async with anthropic.AsyncAnthropic(api_key="sk-wrong", base_url=base_url, max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            await bad.messages.batches.list()
    sim.inject(Fault("429", retry_after=2))
    with pytest.raises(anthropic.RateLimitError) as limited:
        await client.messages.batches.list()
    assert limited.value.response.headers["retry-after"] == "2"
    sim.inject(Fault("503"))
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.batches.list()

    # The docs' `x-api-key` works as well as the SDK's Bearer; `anthropic-version` is required.
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base_url}/v1/messages/batches", headers=headers) as resp:
            assert resp.status == 200
        async with http.get(f"{base_url}/v1/messages/batches", headers={"x-api-key": KEY}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["message"].startswith("anthropic-version")


# -- the adapter ---------------------------------------------------------------------------------------


def test_defaults_are_what_the_sdk_sends() -> None:
    config = AnthropicSourceConfig(provider="anthropic")
    assert config.base_url == "https://api.anthropic.com"
    assert config.api_key_env == "ANTHROPIC_API_KEY"
    assert config.anthropic_version == ANTHROPIC_API_VERSION
    api = make_adapter(workspace_id="wrkspc_1")
    assert api._endpoint.headers == {
        "Authorization": f"Bearer {KEY}",
        "anthropic-version": ANTHROPIC_API_VERSION,
        "anthropic-workspace-id": "wrkspc_1",
    }


async def test_adapter_retrieves_lists_and_cancels(adapter: AnthropicProvider, sim: AnthropicSim) -> None:
    ids = sim.create_batches(2_100, spread=600)
    snap = await adapter.retrieve(ids[0])
    assert (snap.id, snap.status, snap.provider_status) == (ids[0], "in_progress", "in_progress")
    assert snap.entered == {"in_progress": snap.created_at}
    assert snap.expires_at == math.floor(sim.record(ids[0]).t0) + WINDOW
    assert snap.counts is None  # nothing to report before the end
    assert snap.raw == sim.get(ids[0])

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await adapter.list_page(cursor)
        seen += [s.id for s in page.snapshots]
        if page.next is None:
            break
        cursor = page.next
    assert sorted(seen) == sorted(ids)
    assert adapter.requests["list"] == 3  # pages of 1,000

    cancelled = await adapter.cancel(ids[1])
    assert (cancelled.status, cancelled.provider_status) == ("cancelling", "canceling")
    assert cancelled.entered["cancelling"] == math.floor(sim.now())
    with pytest.raises(ApiError) as caught:
        await adapter.retrieve("msgbatch_missing")
    assert (caught.value.status, caught.value.from_api, caught.value.code) == (404, True, "not_found_error")


def _batch(status: str, *, cancel: bool = False, ended: bool = True, **counts: int) -> dict[str, Any]:
    tally = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0) | counts
    return {
        "id": "msgbatch_01abc",
        "type": "message_batch",
        "processing_status": status,
        "request_counts": tally,
        "created_at": "2025-06-15T15:06:40.123456Z",
        "expires_at": "2025-06-16T15:06:40.123456Z",
        "ended_at": "2025-06-15T18:00:00Z" if status == "ended" and ended else None,
        "cancel_initiated_at": "2025-06-15T16:00:00.5+00:00" if cancel else None,
        "archived_at": None,
        "results_url": None,
    }


CREATED, CANCEL_AT, ENDED = 1_750_000_000, 1_750_003_200, 1_750_010_400


@pytest.mark.parametrize(
    ("raw", "status", "entered"),
    [
        (_batch("in_progress", processing=10), "in_progress", {"in_progress": CREATED}),
        (
            _batch("canceling", cancel=True, processing=10),
            "cancelling",
            {"in_progress": CREATED, "cancelling": CANCEL_AT},
        ),
        (_batch("ended", succeeded=9, errored=1), "completed", {"in_progress": CREATED, "completed": ENDED}),
        (_batch("ended", errored=10), "completed", {"in_progress": CREATED, "completed": ENDED}),
        (_batch("ended"), "completed", {"in_progress": CREATED, "completed": ENDED}),
        (_batch("ended", expired=10), "expired", {"in_progress": CREATED, "expired": ENDED}),
        (_batch("ended", succeeded=6, expired=4), "expired", {"in_progress": CREATED, "expired": ENDED}),
        (
            _batch("ended", cancel=True, succeeded=3, canceled=7),
            "cancelled",
            {"in_progress": CREATED, "cancelling": CANCEL_AT, "cancelled": ENDED},
        ),
        (
            _batch("ended", cancel=True, succeeded=10),  # cancelled too late to stop anything: still cancelled
            "cancelled",
            {"in_progress": CREATED, "cancelling": CANCEL_AT, "cancelled": ENDED},
        ),
        (_batch("ended", ended=False, succeeded=1), "completed", {"in_progress": CREATED}),
        (_batch("archived", processing=1), None, {"in_progress": CREATED}),
    ],
)
def test_normalize_maps_every_status(raw: dict[str, Any], status: str | None, entered: dict[str, int]) -> None:
    snap = make_adapter().normalize(raw)
    assert (snap.status, snap.provider_status, dict(snap.entered)) == (status, raw["processing_status"], entered)
    assert snap.created_at == CREATED
    assert snap.expires_at == CREATED + 86_400
    assert snap.raw is raw


def test_counts_are_normalized_once_the_batch_ends() -> None:
    api = make_adapter()
    snap = api.normalize(_batch("ended", succeeded=5, errored=2, canceled=1, expired=0))
    assert snap.counts == Counts(total=8, completed=5, failed=2)
    assert api.normalize(_batch("canceling", cancel=True, processing=8)).counts is None


def test_sim_lifecycles_resolve_as_the_adapter_reads_them(clock: ManualClock) -> None:
    sim = AnthropicSim(clock=clock, profile=SimProfile(p_failed=0.1, p_expired=0.1), seed=11)
    ids = sim.create_batches(200)
    clock.advance(600)
    for batch_id in ids[::7]:
        if sim.common_status(batch_id) == "in_progress":
            sim.cancel(batch_id)
    clock.advance(WINDOW + 1)
    api = make_adapter()
    finals = {api.normalize(sim.get(i)).status for i in ids}
    assert finals == {"completed", "expired", "cancelled"}
    for batch_id in ids:
        snap = api.normalize(sim.get(batch_id))
        assert snap.status == sim.common_status(batch_id)
        assert snap.counts is not None
        assert snap.counts.total == sim.record(batch_id).total


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"id": "batch_x", "object": "batch", "status": "completed"}, "batch_shape"),
        (_batch("ended") | {"type": None}, "batch_shape"),
        (_batch("ended") | {"id": ""}, "batch_shape"),
        (_batch("ended") | {"processing_status": 3}, "batch_shape"),
        (_batch("ended") | {"request_counts": {"processing": 1}}, "batch_shape"),
        (_batch("ended", errored=-1), "invalid_value"),
        (_batch("ended") | {"created_at": 1_750_000_000}, "invalid_value"),
        (_batch("ended") | {"created_at": "2025-06-15"}, "invalid_value"),
        (_batch("ended") | {"ended_at": "yesterday"}, "invalid_value"),
        (_batch("ended") | {"expires_at": "2200-01-01T00:00:00Z"}, "invalid_value"),
    ],
)
def test_bad_bodies_are_bad_responses(raw: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadResponseError) as caught:
        make_adapter().normalize(raw)
    assert caught.value.reason == reason


async def test_bad_answers_and_foreign_404s(adapter: AnthropicProvider, sim: AnthropicSim) -> None:
    batch_id = sim.create_batch()["id"]
    for kind, reason in (("nonjson", "not_json"), ("deep_json", "batch_shape"), ("huge_int", "invalid_value")):
        sim.inject(Fault(kind))  # type: ignore[arg-type]
        with pytest.raises(BadResponseError) as caught:
            await adapter.retrieve(batch_id)
        assert caught.value.reason == reason
    sim.inject(Fault("unknown_status", status="paused"))
    snap = await adapter.retrieve(batch_id)
    assert (snap.status, snap.provider_status) == (None, "paused")
    sim.inject(Fault("html404"))
    with pytest.raises(ApiError) as foreign:
        await adapter.retrieve(batch_id)
    assert (foreign.value.status, foreign.value.from_api) == (404, False)


def test_retry_after_reads_retry_after_then_the_exhausted_limits_reset() -> None:
    api, now = make_adapter(), 1_750_000_000.0
    reset = rfc3339(now + 20)
    assert api.retry_after({"retry-after": "7", "anthropic-ratelimit-requests-reset": reset}, now) == 7
    exhausted = {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": reset}
    assert api.retry_after(exhausted, now) == 20
    both = exhausted | {
        "anthropic-ratelimit-input-tokens-remaining": "0",
        "anthropic-ratelimit-input-tokens-reset": rfc3339(now + 45),
        "anthropic-ratelimit-output-tokens-remaining": "900",
        "anthropic-ratelimit-output-tokens-reset": rfc3339(now + 90),
    }
    assert api.retry_after(both, now) == 45  # the latest of the exhausted ones, not of every limit
    assert (
        api.retry_after(
            {"anthropic-ratelimit-requests-remaining": "3", "anthropic-ratelimit-requests-reset": reset}, now
        )
        is None
    )
    assert (
        api.retry_after(
            {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": "soon"}, now
        )
        is None
    )
    assert api.retry_after({}, now) is None


async def test_429_and_529_pause_the_adapter_as_asked() -> None:
    sim = AnthropicSim(clock=SimClock(), seed=1)  # rate-limit resets run on the wall clock
    async with serve(sim) as url, make_adapter(url) as api:
        batch_id = sim.create_batch()["id"]
        sim.inject(Fault("429", retry_after=3))
        with pytest.raises(ApiError) as limited:
            await api.retrieve(batch_id)
        assert (limited.value.status, limited.value.retry_after, limited.value.code) == (429, 3, "rate_limit_error")
        assert api.paused_until == pytest.approx(time.monotonic() + 3, abs=0.5)

    sim = AnthropicSim(clock=SimClock(), seed=2)
    async with serve(sim) as url, make_adapter(url) as api:
        batch_id = sim.create_batch()["id"]
        sim.inject(Fault("429", retry_after=None))  # only the anthropic-ratelimit-* headers say how long
        with pytest.raises(ApiError) as limited:
            await api.retrieve(batch_id)
        assert limited.value.retry_after is not None
        assert 0 < limited.value.retry_after <= 2
        assert api.paused_until > time.monotonic()

    sim = AnthropicSim(clock=SimClock(), seed=3)
    async with serve(sim) as url, make_adapter(url) as api:
        sim.inject(Fault("503", retry_after=2))
        with pytest.raises(ApiError) as overloaded:
            await api.list_page(None)
        assert (overloaded.value.status, overloaded.value.code, overloaded.value.retry_after) == (
            529,
            "overloaded_error",
            2,
        )
        assert api.paused_until == pytest.approx(time.monotonic() + 2, abs=0.5)


# -- end to end ----------------------------------------------------------------------------------------


async def test_daemon_discovers_and_follows_anthropic_batches_to_their_end(tmp_path: Any) -> None:
    sim = AnthropicSim(clock=SimClock(speed=0.001), profile=FAST_PROFILE, seed=5)  # frozen until all are seen
    async with serve(sim) as url:
        ids = sim.create_batches(8)
        ids += sim.create_batches(2, created_at=sim.now() - WINDOW + 60, outcome="expired")
        events_file = tmp_path / "events.jsonl"
        raw = config_dict("http://placeholder", tmp_path / "state.db", [{"kind": "file", "path": str(events_file)}])
        del raw["source"]
        raw["sources"] = [{"provider": "anthropic", "base_url": url, "api_key_env": KEY_ENV, "discover": True}]

        def finals() -> dict[str, str]:
            return {
                e["data"]["id"]: e["data"]["status"] for e in read_jsonl(events_file) if e["data"]["status"] in FINAL
            }

        async with running(make_config(raw)):
            await eventually(lambda: {e["data"]["id"] for e in read_jsonl(events_file)} == set(ids))
            sim.cancel(ids[0])
            sim.clock.speed = 40  # type: ignore[attr-defined]
            await eventually(lambda: set(finals()) == set(ids), timeout=60)

    events = read_jsonl(events_file)
    assert {sim.common_status(i) for i in ids} >= {"completed", "expired", "cancelled"}
    for batch_id in ids:
        every = [e for e in events if e["data"]["id"] == batch_id]
        got = [e for e in every if e["type"] == f"batch.{e['data']['status']}"]
        final = sim.common_status(batch_id)
        path = ["in_progress", "cancelling", final] if batch_id == ids[0] else ["in_progress", final]
        assert [e["data"]["status"] for e in got] == path, batch_id
        # `expires_at` is read: the two about to run out of their 24 hours were announced as expiring.
        assert ("batch.expiring" in {e["type"] for e in every}) == (final == "expired")
        assert [e["data"]["sequence"] for e in every] == sorted(e["data"]["sequence"] for e in every)
        for event in every:
            data = event["data"]
            assert (data["source"], data["provider"]) == ("anthropic", "anthropic")
            assert data["provider_status"] == data["batch"]["processing_status"]
        last = got[-1]["data"]
        assert last["provider_status"] == "ended"
        assert last["batch"] == sim.get(batch_id)  # the provider's object, unchanged
        counts = last["batch"]["request_counts"]
        assert last["request_counts"] == {
            "total": sum(counts.values()),
            "completed": counts["succeeded"],
            "failed": counts["errored"],
        }
        assert all(e["data"]["request_counts"] is None for e in got[:-1])
