"""Gemini API batch mode: the simulator as the official `google-genai` SDK sees it, the adapter against the
simulator, and a daemon following batches through their whole lifecycle.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from poller.config.sources import GeminiSourceConfig
from poller.domain.schedule import Pacer
from poller.domain.snapshot import Counts
from poller.errors import ApiError, BadResponseError
from poller.metrics import Metrics
from poller.providers.gemini import STATUS_MAP, GeminiProvider
from poller.sim import Fault, ManualClock, SimClock, SimProfile, serve
from poller.sim.gemini import WINDOW, WIRE_STATE, GeminiSim, timestamp
from tests.helpers import FAST_PROFILE, FINAL, KEY, KEY_ENV, config_dict, eventually, make_config, read_jsonl, running

START = 1_750_000_000.0
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
#: google-genai's async client subclasses aiohttp's ClientSession, which aiohttp warns about: not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession is discouraged:DeprecationWarning"
)
INLINE: Any = [{"contents": [{"parts": [{"text": f"question {i}"}], "role": "user"}]} for i in range(4)]


def bare(name: str) -> str:
    """The id batch-poller keys a Gemini batch by: its resource name without `batches/`."""
    return name.removeprefix("batches/")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=START)


@pytest.fixture
def sim(clock: ManualClock) -> GeminiSim:
    return GeminiSim(clock=clock, profile=FIXED, seed=3)


@pytest.fixture
async def base_url(sim: GeminiSim) -> AsyncIterator[str]:
    async with serve(sim) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> genai.client.AsyncClient:
    options = types.HttpOptions(base_url=base_url, api_version="v1beta")
    return genai.Client(api_key=KEY, http_options=options).aio


def make_adapter(base_url: str = "http://127.0.0.1:9", **config: Any) -> GeminiProvider:
    source = GeminiSourceConfig(provider="gemini", base_url=base_url, **config)
    return GeminiProvider(source, KEY, metrics=Metrics().source("gemini"), pacer=Pacer(100.0))


@pytest.fixture
async def adapter(base_url: str) -> AsyncIterator[GeminiProvider]:
    async with make_adapter(base_url) as api:
        yield api


async def raw_get(base_url: str, name: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(headers={"x-goog-api-key": KEY}) as http,
        http.get(f"{base_url}/v1beta/{name}") as resp,
    ):
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


# -- the SDK's view ------------------------------------------------------------------------------------


async def test_sdk_creates_and_gets_inline_and_file_batches(
    client: genai.client.AsyncClient, base_url: str, sim: GeminiSim
) -> None:
    inline = await client.batches.create(model="gemini-2.5-flash", src=INLINE, config={"display_name": "nightly"})
    assert inline.name is not None
    assert inline.name.startswith("batches/")
    assert inline.state == types.JobState.JOB_STATE_PENDING
    assert inline.display_name == "nightly"
    assert inline.model == "models/gemini-2.5-flash"
    assert inline.create_time is not None
    assert inline.create_time.timestamp() == START
    assert inline.end_time is None
    from_file = await client.batches.create(model="gemini-2.5-pro", src="files/input-abc")
    fetched = await client.batches.get(name=from_file.name or "")
    assert fetched.model_dump() == from_file.model_dump()
    assert (sim.stats.create, sim.stats.retrieve) == (2, 1)

    with pytest.raises(ValueError, match="Invalid batch job name"):  # the SDK wants the full name
        await client.batches.get(name=(inline.name or "").removeprefix("batches/"))
    # What the SDK drops: the counts, as int64 decimal strings, zeros left out as protobuf JSON does.
    body = await raw_get(base_url, inline.name)
    assert body["metadata"]["batchStats"] == {"requestCount": "4", "pendingRequestCount": "4"}
    assert "done" not in body
    assert body["metadata"]["createTime"] == "2025-06-15T15:06:40.000000000Z"


async def test_sdk_pager_walks_every_page(client: genai.client.AsyncClient, sim: GeminiSim, clock: ManualClock) -> None:
    assert [j async for j in await client.batches.list()] == []
    names = sim.create_batches(23)
    clock.advance(5)
    names += sim.create_batches(14, spread=3_600)
    sim.stats.reset()
    seen = [j.name or "" async for j in await client.batches.list(config={"page_size": 10})]
    assert sorted(seen) == sorted(names)
    assert len(seen) == len(set(seen))
    assert sim.stats.list == math.ceil(len(names) / 10)
    with pytest.raises(errors.ClientError) as caught:
        await client.batches.list(config={"page_token": "bm90LWEtYmF0Y2g="})
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")


async def test_sdk_cancel_keeps_the_state_until_cancelled(
    client: genai.client.AsyncClient, sim: GeminiSim, clock: ManualClock
) -> None:
    job = await client.batches.create(model="gemini-2.5-flash", src="files/input-abc")
    name = job.name or ""
    clock.advance(10 + 500)
    await client.batches.cancel(name=name)
    assert (await client.batches.get(name=name)).state == types.JobState.JOB_STATE_RUNNING  # no cancelling state
    await client.batches.cancel(name=name)  # again while it is being cancelled: accepted
    clock.advance(30)
    done = await client.batches.get(name=name)
    assert done.state == types.JobState.JOB_STATE_CANCELLED
    assert done.end_time is not None
    assert done.end_time.timestamp() == START + 10 + 500 + 30
    with pytest.raises(errors.ClientError) as caught:
        await client.batches.cancel(name=name)
    assert caught.value.status == "FAILED_PRECONDITION"
    assert sim.common_status(name) == "cancelled"


async def test_sdk_follows_a_lifecycle_whose_counts_move(
    client: genai.client.AsyncClient, base_url: str, clock: ManualClock
) -> None:
    job = await client.batches.create(model="gemini-2.5-flash", src=INLINE * 25)
    name = job.name or ""
    states: list[types.JobState | None] = []
    finished: list[int] = []
    last: Any = job
    for _ in range(60):
        last = await client.batches.get(name=name)
        if not states or states[-1] != last.state:
            states.append(last.state)
        stats = (await raw_get(base_url, name))["metadata"]["batchStats"]
        finished.append(int(stats.get("successfulRequestCount", 0)) + int(stats.get("failedRequestCount", 0)))
        if last.done:
            break
        clock.advance(25)
    js = types.JobState
    assert states == [js.JOB_STATE_PENDING, js.JOB_STATE_RUNNING, js.JOB_STATE_SUCCEEDED]
    assert all(a <= b for a, b in itertools.pairwise(finished))
    assert len(set(finished)) > 10  # the REST API shows progress
    assert finished[-1] == 100
    assert last.end_time.timestamp() == START + 10 + 1_000 + 50
    responses = last.dest.inlined_responses
    assert len(responses) == 100
    assert sum(r.error is not None for r in responses) == 10


async def test_sdk_errors_in_google_shape(client: genai.client.AsyncClient, base_url: str, sim: GeminiSim) -> None:
    with pytest.raises(errors.ClientError) as missing:
        await client.batches.get(name="batches/missing")
    assert (missing.value.code, missing.value.status) == (404, "NOT_FOUND")
    wrong = genai.Client(api_key="wrong", http_options=types.HttpOptions(base_url=base_url, api_version="v1beta"))
    with pytest.raises(errors.ClientError) as refused:
        await wrong.aio.batches.get(name="batches/missing")
    assert (refused.value.code, refused.value.status) == (400, "INVALID_ARGUMENT")
    assert "API key not valid" in (refused.value.message or "")
    sim.inject(Fault("429", retry_after=4))
    with pytest.raises(errors.ClientError) as limited:
        await client.batches.list()
    assert (limited.value.code, limited.value.status) == (429, "RESOURCE_EXHAUSTED")
    sim.inject(Fault("503"))
    with pytest.raises(errors.ServerError):
        await client.batches.list()
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/v1beta/batches") as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["status"] == "PERMISSION_DENIED"


# -- the adapter ---------------------------------------------------------------------------------------


def test_defaults_are_the_sdks() -> None:
    config = GeminiSourceConfig(provider="gemini")
    assert (config.base_url, config.api_version) == ("https://generativelanguage.googleapis.com", "v1beta")
    assert config.api_key_env == "GEMINI_API_KEY"
    api = make_adapter("http://gemini.test", api_version="v1alpha")
    assert api._endpoint.base_url == "http://gemini.test/v1alpha"
    assert api._endpoint.headers == {"x-goog-api-key": KEY}


async def test_adapter_retrieves_lists_and_cancels(adapter: GeminiProvider, sim: GeminiSim, clock: ManualClock) -> None:
    names = sim.create_batches(1) + sim.create_batches(229, spread=600)
    snap = await adapter.retrieve(names[0])
    assert (snap.id, snap.status, snap.provider_status) == (bare(names[0]), "validating", "BATCH_STATE_PENDING")
    assert snap.entered == {"validating": snap.created_at}
    assert snap.counts == Counts(total=100, completed=0, failed=0)
    assert snap.raw == sim.get(names[0])

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await adapter.list_page(cursor)
        seen += [s.id for s in page.snapshots]
        if page.next is None:
            break
        cursor = page.next
    assert sorted(seen) == sorted(map(bare, names))
    assert adapter.requests["list"] == 3  # pages of 100

    clock.advance(10 + 500)
    cancelled = await adapter.cancel(names[0])  # `{}`, then the batch read back
    assert (cancelled.id, cancelled.status, cancelled.provider_status) == (
        bare(names[0]),
        "in_progress",
        "BATCH_STATE_RUNNING",
    )
    assert (adapter.requests["cancel"], adapter.requests["retrieve"]) == (1, 2)
    clock.advance(30)
    assert (await adapter.retrieve(names[0])).status == "cancelled"

    with pytest.raises(ApiError) as missing:
        await adapter.retrieve("batches/missing")
    assert (missing.value.status, missing.value.from_api, missing.value.code) == (404, True, "NOT_FOUND")
    # The bare id and the resource name are one batch.
    assert (await adapter.retrieve(bare(names[2]))).raw == (await adapter.retrieve(names[2])).raw
    with pytest.raises(ApiError) as nested:
        await adapter.retrieve("batches/a/b")
    assert nested.value.status == 400
    assert adapter.requests["retrieve"] == 6  # a malformed name is refused before any request


def _op(state: str, /, *, ended: bool = True, stats: Any = None, **meta: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "model": "models/gemini-2.5-flash",
        "displayName": "nightly",
        "createTime": "2025-06-15T15:06:40.123456789Z",
        "updateTime": "2025-06-15T16:00:00Z",
        "state": state,
        "name": "batches/abc123",
    }
    if ended:
        metadata["endTime"] = "2025-06-15T18:00:00.5Z"
    if stats is not None:
        metadata["batchStats"] = stats
    return {"name": "batches/abc123", "metadata": metadata | meta}


CREATED, UPDATED, ENDED = 1_750_000_000, 1_750_003_200, 1_750_010_400


@pytest.mark.parametrize(
    ("raw", "status", "entered"),
    [
        (_op("BATCH_STATE_PENDING", ended=False), "validating", {"validating": CREATED}),
        (_op("BATCH_STATE_RUNNING", ended=False), "in_progress", {"validating": CREATED}),
        (_op("BATCH_STATE_SUCCEEDED"), "completed", {"validating": CREATED, "completed": ENDED}),
        (_op("BATCH_STATE_FAILED"), "failed", {"validating": CREATED, "failed": ENDED}),
        (_op("BATCH_STATE_CANCELLED"), "cancelled", {"validating": CREATED, "cancelled": ENDED}),
        (_op("BATCH_STATE_EXPIRED"), "expired", {"validating": CREATED, "expired": ENDED}),
        (_op("BATCH_STATE_SUCCEEDED", ended=False), "completed", {"validating": CREATED, "completed": UPDATED}),
        (_op("BATCH_STATE_UNSPECIFIED", ended=False), None, {"validating": CREATED}),
        (_op("BATCH_STATE_PAUSED", ended=False), None, {"validating": CREATED}),
    ],
)
def test_normalize_maps_every_state(raw: dict[str, Any], status: str | None, entered: dict[str, int]) -> None:
    snap = make_adapter().normalize(raw)
    assert (snap.id, snap.status, snap.provider_status) == ("abc123", status, raw["metadata"]["state"])
    assert dict(snap.entered) == entered
    assert snap.created_at == CREATED
    assert snap.raw is raw


def test_every_wire_state_of_the_simulator_is_mapped() -> None:
    assert set(WIRE_STATE.values()) == set(STATUS_MAP)


@pytest.mark.parametrize(
    ("stats", "counts"),
    [
        (None, None),
        ({}, Counts(0, 0, 0)),
        ({"requestCount": "10", "pendingRequestCount": "10"}, Counts(10, 0, 0)),
        ({"requestCount": "10", "successfulRequestCount": "6", "failedRequestCount": "1"}, Counts(10, 6, 1)),
        ({"requestCount": 10, "successfulRequestCount": 10}, Counts(10, 10, 0)),
    ],
)
def test_batch_stats_are_normalized(stats: dict[str, Any] | None, counts: Counts | None) -> None:
    assert make_adapter().normalize(_op("BATCH_STATE_RUNNING", ended=False, stats=stats)).counts == counts


def test_sim_lifecycles_map_as_the_simulator_means_them(clock: ManualClock) -> None:
    sim = GeminiSim(clock=clock, profile=SimProfile(p_failed=0.1, p_expired=0.1), seed=11)
    names = sim.create_batches(200)
    api = make_adapter()
    seen: set[str | None] = set()
    for step, seconds in enumerate([20.0] * 8 + [WINDOW / 20] * 25):
        clock.advance(seconds)
        for name in names[step::9][:3]:
            if sim.common_status(name) in {"validating", "in_progress"}:
                sim.cancel(name)
        for name in names:
            snap = api.normalize(sim.get(name))
            assert snap.status == sim.common_status(name)
            seen.add(snap.status)
    assert seen == set(STATUS_MAP.values())


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"id": "batch_x", "object": "batch", "status": "completed"}, "batch_shape"),
        (_op("BATCH_STATE_RUNNING") | {"name": "operations/abc"}, "batch_shape"),
        (_op("BATCH_STATE_RUNNING") | {"metadata": None}, "batch_shape"),
        (_op("BATCH_STATE_RUNNING", state=5), "batch_shape"),
        (_op("BATCH_STATE_RUNNING", createTime=None), "invalid_value"),
        (_op("BATCH_STATE_RUNNING", createTime="15 June"), "invalid_value"),
        (_op("BATCH_STATE_SUCCEEDED", endTime=1_750_000_000), "invalid_value"),
        (_op("BATCH_STATE_RUNNING", stats={"requestCount": "ten"}), "invalid_value"),
        (_op("BATCH_STATE_RUNNING", stats={"requestCount": "1", "successfulRequestCount": "2"}), "invalid_value"),
        (_op("BATCH_STATE_RUNNING", stats=[1]), "invalid_value"),
    ],
)
def test_bad_bodies_are_bad_responses(raw: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadResponseError) as caught:
        make_adapter().normalize(raw)
    assert caught.value.reason == reason


async def test_bad_answers_and_foreign_404s(adapter: GeminiProvider, sim: GeminiSim) -> None:
    name = sim.create_batch()["name"]
    for kind, reason in (("nonjson", "not_json"), ("deep_json", "batch_shape"), ("huge_int", "invalid_value")):
        sim.inject(Fault(kind))  # type: ignore[arg-type]
        with pytest.raises(BadResponseError) as caught:
            await adapter.retrieve(name)
        assert caught.value.reason == reason
    sim.inject(Fault("unknown_status", status="BATCH_STATE_PAUSED", route="list"))
    page = await adapter.list_page(None)
    assert [(s.status, s.provider_status) for s in page.snapshots] == [(None, "BATCH_STATE_PAUSED")]
    sim.inject(Fault("html404"))
    with pytest.raises(ApiError) as foreign:
        await adapter.retrieve(name)
    assert (foreign.value.status, foreign.value.from_api) == (404, False)


async def test_rate_limits_and_key_errors() -> None:
    sim = GeminiSim(clock=SimClock(), seed=1)
    async with serve(sim) as url, make_adapter(url) as api:
        name = sim.create_batch()["name"]
        sim.inject(Fault("429", retry_after=3))  # the delay is in the body: google.rpc.RetryInfo
        with pytest.raises(ApiError) as limited:
            await api.retrieve(name)
        assert (limited.value.status, limited.value.code, limited.value.retry_after) == (429, "RESOURCE_EXHAUSTED", 3)
        assert api.paused_until == pytest.approx(time.monotonic() + 3, abs=0.5)
        assert api.pacer.rate == 50.0  # halved once, though the pause was set twice

    sim = GeminiSim(clock=SimClock(), seed=2)
    async with serve(sim) as url, make_adapter(url) as api:
        sim.inject(Fault("429"))
        with pytest.raises(ApiError) as bare_429:
            await api.list_page(None)
        assert bare_429.value.retry_after is None
        sim.inject(Fault("503", retry_after=2))
        with pytest.raises(ApiError) as unavailable:
            await api.list_page(None)
        assert (unavailable.value.status, unavailable.value.code, unavailable.value.retry_after) == (
            503,
            "UNAVAILABLE",
            2,
        )

    sim = GeminiSim(clock=SimClock(), seed=3)
    async with serve(sim) as url:
        wrong = GeminiProvider(
            GeminiSourceConfig(provider="gemini", base_url=url),
            "wrong-key",
            metrics=Metrics().source("gemini"),
            pacer=Pacer(100.0),
        )
        async with wrong:
            with pytest.raises(ApiError) as refused:
                await wrong.list_page(None)
        assert (refused.value.status, refused.value.kind, refused.value.code) == (401, "auth", "API_KEY_INVALID")
        assert "answered 400" in str(refused.value)  # what the API said stays in the message


def test_timestamps_of_the_simulator_parse() -> None:
    assert timestamp(START + 0.25) == "2025-06-15T15:06:40.250000000Z"


# -- end to end ----------------------------------------------------------------------------------------


async def test_daemon_follows_gemini_batches_to_their_end(tmp_path: Any) -> None:
    sim = GeminiSim(clock=SimClock(speed=0.001), profile=FAST_PROFILE, seed=5)  # frozen until all are seen
    async with serve(sim) as url:
        names = sim.create_batches(6, outcome="completed")
        names += sim.create_batches(2, outcome="failed")
        names += sim.create_batches(2, created_at=sim.now() - WINDOW + 60, outcome="expired")
        expected = {n: ["validating", "in_progress", "completed"] for n in names[:6]}
        expected |= {n: ["validating", "failed"] for n in names[6:8]}
        expected |= {n: ["validating", "in_progress", "expired"] for n in names[8:]}
        expected[names[0]] = ["validating", "cancelled"]
        events_file = tmp_path / "events.jsonl"
        raw = config_dict("http://placeholder", tmp_path / "state.db", [{"kind": "file", "path": str(events_file)}])
        del raw["source"]
        raw["sources"] = [{"provider": "gemini", "name": "google", "base_url": url, "api_key_env": KEY_ENV}]

        def statuses() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for e in read_jsonl(events_file):
                if e["type"] == f"batch.{e['data']['status']}":
                    out.setdefault(e["data"]["id"], []).append(e["data"]["status"])
            return out

        async with running(make_config(raw)) as daemon:
            assert await daemon.runner(None).track(names, "test") == list(map(bare, names))
            await eventually(lambda: set(statuses()) == set(map(bare, names)))
            sim.cancel(names[0])  # still PENDING: it never runs
            sim.clock.speed = 40  # type: ignore[attr-defined]
            await eventually(lambda: all(s[-1] in FINAL for s in statuses().values()), timeout=60)

    assert statuses() == {bare(n): path for n, path in expected.items()}
    events = read_jsonl(events_file)
    for name in names:
        got = [e for e in events if e["data"]["id"] == bare(name)]
        assert [e["data"]["sequence"] for e in got] == sorted(e["data"]["sequence"] for e in got)
        for event in got:
            data = event["data"]
            assert (data["source"], data["provider"]) == ("google", "gemini")
            assert data["provider_status"] == data["batch"]["metadata"]["state"]
            stats = data["batch"]["metadata"]["batchStats"]
            assert data["request_counts"] == {
                "total": int(stats.get("requestCount", 0)),
                "completed": int(stats.get("successfulRequestCount", 0)),
                "failed": int(stats.get("failedRequestCount", 0)),
            }
        assert got[-1]["data"]["batch"] == sim.get(name)  # the provider's object, unchanged
        assert got[-1]["data"]["provider_status"] == WIRE_STATE[expected[name][-1]]
