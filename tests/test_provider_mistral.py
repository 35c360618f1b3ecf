"""Mistral batch jobs: the simulator validated by the official `mistralai` SDK, the adapter against the
simulator, and a daemon following Mistral jobs to their final statuses."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import SDKError

from poller.config.sources import MistralSourceConfig
from poller.domain.schedule import Pacer
from poller.domain.snapshot import Counts
from poller.errors import ApiError, BadResponseError
from poller.metrics import Metrics
from poller.providers.base import Provider
from poller.providers.mistral import MINUTE, STATUS_MAP, MistralProvider
from poller.sim import Fault, ManualClock, SimProfile, serve
from poller.sim.mistral import MistralSim
from tests.helpers import KEY
from tests.provider_checks import adapter_for, bulk_refresh, check_events, follow_to_the_end, frozen

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


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=START)


@pytest.fixture
def sim(clock: ManualClock) -> MistralSim:
    return MistralSim(clock=clock, profile=FIXED, seed=3)


@pytest.fixture
async def url(sim: MistralSim) -> AsyncIterator[str]:
    async with serve(sim) as base:
        yield base


@pytest.fixture
async def client(url: str) -> AsyncIterator[Mistral]:
    async with Mistral(api_key=KEY, server_url=url) as sdk:
        yield sdk


@pytest.fixture
async def adapter(url: str) -> AsyncIterator[Provider]:
    async with adapter_for("mistral", url) as provider:
        yield provider


def job(**fields: Any) -> dict[str, Any]:
    """A Mistral BatchJob as the API sends it (the fields of the SDK's model)."""
    body: dict[str, Any] = {
        "id": "7d5b1f0e-8a47-4c59-9b7e-2f1a3c4d5e6f",
        "object": "batch",
        "input_files": ["f0c1"],
        "metadata": {"team": "search", "n": 3},
        "endpoint": "/v1/chat/completions",
        "model": "mistral-small-latest",
        "agent_id": None,
        "output_file": None,
        "error_file": None,
        "errors": [],
        "outputs": None,
        "status": "RUNNING",
        "created_at": 1_750_000_000,
        "total_requests": 100,
        "completed_requests": 40,
        "succeeded_requests": 38,
        "failed_requests": 2,
        "started_at": 1_750_000_060,
        "completed_at": None,
    }
    return body | fields


# -- the SDK's view ------------------------------------------------------------------------------------


async def test_sdk_creates_gets_and_cancels(client: Mistral, sim: MistralSim, clock: ManualClock) -> None:
    created = await client.batch.jobs.create_async(
        endpoint="/v1/chat/completions", model="mistral-small-latest", input_files=["file-1"], metadata={"job": "x"}
    )
    assert created.status == "QUEUED"
    assert created.created_at == int(START)
    assert created.metadata == {"job": "x"}
    assert created.started_at is None
    clock.advance(10 + 500)
    running = await client.batch.jobs.get_async(job_id=created.id)
    assert running.status == "RUNNING"
    assert running.started_at == int(START) + 10
    assert 0 < running.succeeded_requests + running.failed_requests == running.completed_requests < 100

    cancelling = await client.batch.jobs.cancel_async(job_id=created.id)
    assert cancelling.status == "CANCELLATION_REQUESTED"
    clock.advance(30)
    cancelled = await client.batch.jobs.get_async(job_id=created.id)
    assert cancelled.status == "CANCELLED"
    assert cancelled.completed_at == int(clock.now())
    assert cancelled.completed_requests == cancelling.completed_requests
    with pytest.raises(SDKError) as caught:
        await client.batch.jobs.cancel_async(job_id=created.id)
    assert caught.value.status_code == 409
    assert sim.stats.as_dict()["total"] == 5


async def test_sdk_pages_through_every_job_newest_first(client: Mistral, sim: MistralSim, clock: ManualClock) -> None:
    ids = sim.create_batches(120)
    clock.advance(5)
    ids += sim.create_batches(90, spread=3_600)  # backdated: they sort among the older ones
    clock.advance(5)
    ids += sim.create_batches(40)
    position = {batch_id: i for i, batch_id in enumerate(ids)}
    expected = sorted(ids, key=lambda i: (sim.get(i)["created_at"], position[i]), reverse=True)

    sim.stats.reset()
    seen: list[str] = []
    page = 0
    while True:
        answer = await client.batch.jobs.list_async(page=page, page_size=100)
        assert answer.total == len(ids)
        seen += [j.id for j in answer.data or []]
        page += 1
        if page * 100 >= answer.total:
            break
    assert seen == expected
    assert sim.stats.list == 3

    oldest = await client.batch.jobs.list_async(page=0, page_size=5, order_by="created")
    assert [j.id for j in oldest.data or []] == expected[::-1][:5]
    clock.advance(10 + 1)
    sim.cancel(ids[0])
    queued = await client.batch.jobs.list_async(status=["CANCELLATION_REQUESTED"])
    assert [j.id for j in queued.data or []] == [ids[0]]
    after = await client.batch.jobs.list_async(created_after=datetime.fromtimestamp(START + 7, UTC))
    assert {j.id for j in after.data or []} == set(ids[-40:])


async def test_sdk_sees_errors_in_mistral_shape(client: Mistral, url: str, sim: MistralSim) -> None:
    with pytest.raises(SDKError) as caught:
        await client.batch.jobs.get_async(job_id="nope")
    assert caught.value.status_code == 404
    assert '"object":"error"' in caught.value.body.replace(" ", "")
    with pytest.raises(SDKError) as caught:
        await client.batch.jobs.list_async(page_size=0)
    assert caught.value.status_code == 422
    sim.inject(Fault("429"))
    with pytest.raises(SDKError) as caught:
        await client.batch.jobs.list_async()
    assert caught.value.status_code == 429
    assert caught.value.headers["x-ratelimit-remaining-req-minute"] == "0"
    async with Mistral(api_key="wrong-key", server_url=url) as bad:
        with pytest.raises(SDKError) as caught:
            await bad.batch.jobs.list_async()
    assert caught.value.status_code == 401


async def test_sdk_follows_a_lifecycle(client: Mistral, sim: MistralSim, clock: ManualClock) -> None:
    job_id = sim.create_batch()["id"]
    statuses: list[str] = []
    for _ in range(60):
        got = await client.batch.jobs.get_async(job_id=job_id)
        if not statuses or statuses[-1] != got.status:
            statuses.append(str(got.status))
        if got.status == "SUCCESS":
            break
        clock.advance(25)
    assert statuses == ["QUEUED", "RUNNING", "SUCCESS"]  # the shared finalizing phase shows as RUNNING
    assert got.completed_at == int(START) + 1_060
    assert (got.succeeded_requests, got.failed_requests, got.total_requests) == (90, 10, 100)
    assert got.output_file
    assert got.error_file


async def test_admin_routes_create_jobs(url: str, sim: MistralSim) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/_sim/batches", json={"count": 3, "metadata": {"src": "bench"}}) as resp:
            created = await resp.json()
        assert created["count"] == 3
        assert sim.get(created["ids"][0])["metadata"] == {"src": "bench"}
        async with http.post(f"{url}/_sim/batches", json={"endpoint": "/v1/images"}) as resp:
            assert resp.status == 400


# -- the adapter ---------------------------------------------------------------------------------------


async def test_adapter_retrieves_lists_and_cancels(adapter: Provider, sim: MistralSim, clock: ManualClock) -> None:
    ids = sim.create_batches(230, metadata={"team": "search"})
    snap = await adapter.retrieve(ids[5])
    assert (snap.id, snap.status, snap.provider_status) == (ids[5], "validating", "QUEUED")
    assert snap.metadata == {"team": "search"}
    assert snap.endpoint == "/v1/chat/completions"
    assert snap.raw == sim.get(ids[5])

    sim.stats.reset()
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await adapter.list_page(cursor)
        pages += 1
        seen += [s.id for s in page.snapshots]
        if page.next is None:
            break
        cursor = page.next
    assert sorted(seen) == sorted(ids)
    assert pages == sim.stats.list == 3
    assert adapter.capabilities.paging == "offset"

    clock.advance(10 + 100)
    cancelling = await adapter.cancel(ids[0])
    assert (cancelling.status, cancelling.provider_status) == ("cancelling", "CANCELLATION_REQUESTED")
    clock.advance(30)
    cancelled = await adapter.retrieve(ids[0])
    assert cancelled.status == "cancelled"
    assert cancelled.entered == {
        "validating": int(START),
        "in_progress": int(START) + 10,
        "cancelled": int(clock.now()),
    }
    assert adapter.requests == {"retrieve": 2, "list": 3, "cancel": 1}


@pytest.mark.parametrize(("status", "common"), [*STATUS_MAP.items(), ("PAUSED", None)])
def test_normalize_maps_every_status(status: str, common: str | None) -> None:
    snap = _adapter().normalize(job(status=status))
    assert snap.status == common
    assert snap.provider_status == status


def test_normalize_counts_stamps_and_metadata() -> None:
    snap = _adapter().normalize(job(status="SUCCESS", completed_at=1_750_000_900))
    assert snap.counts == Counts(total=100, completed=38, failed=2)
    assert snap.entered == {"validating": 1_750_000_000, "in_progress": 1_750_000_060, "completed": 1_750_000_900}
    assert snap.metadata == {"team": "search"}  # non-string values cannot be discovery filters
    assert snap.expires_at is None  # Mistral's job object has no deadline
    queued = _adapter().normalize(job(status="QUEUED", started_at=None))
    assert queued.entered == {"validating": 1_750_000_000}


@pytest.mark.parametrize(
    "broken",
    [
        {"id": None},
        {"status": 7},
        {"created_at": "yesterday"},
        {"total_requests": None},
        {"succeeded_requests": -1},
        {"succeeded_requests": 99, "failed_requests": 2},
        {"created_at": 2**70},
        {"started_at": 12},
    ],
)
def test_bad_bodies_are_bad_responses(broken: dict[str, Any]) -> None:
    with pytest.raises(BadResponseError):
        _adapter().normalize(job(**broken))


async def test_bad_answers_over_http(adapter: Provider, sim: MistralSim) -> None:
    job_id = sim.create_batch()["id"]
    for kind in ("nonjson", "deep_json", "huge_int"):
        sim.inject(Fault(kind))
        with pytest.raises(BadResponseError):
            await adapter.retrieve(job_id)
    sim.inject(Fault("huge_int", route="list"))
    page = await adapter.list_page(None)
    assert page.snapshots == []
    assert page.rejected[0][0] == job_id
    sim.inject(Fault("unknown_status", status="PAUSED"))
    assert (await adapter.retrieve(job_id)).status is None


async def test_a_json_404_is_the_apis_own_not_found(adapter: Provider, sim: MistralSim) -> None:
    with pytest.raises(ApiError) as caught:
        await adapter.retrieve("7d5b1f0e-0000-0000-0000-000000000000")
    assert (caught.value.status, caught.value.from_api) == (404, True)
    assert "not found" in str(caught.value)
    sim.inject(Fault("html404"))
    with pytest.raises(ApiError) as caught:
        await adapter.retrieve("anything")
    assert (caught.value.status, caught.value.from_api) == (404, False)


async def test_rejected_key_is_an_auth_error(url: str) -> None:
    config = MistralSourceConfig(provider="mistral", base_url=url, api_key_env="X")
    async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{url}/v1/batch/jobs") as resp:
        assert resp.status == 401
        assert (await resp.json())["message"] == "Unauthorized"
    async with MistralProvider(config, "wrong", metrics=Metrics().source("m"), pacer=Pacer(10.0)) as bad:
        with pytest.raises(ApiError) as caught:
            await bad.list_page(None)
    assert (caught.value.kind, caught.value.from_api) == ("auth", True)


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "3", "x-ratelimit-remaining-req-minute": "0"}, 3.0),
        ({"x-ratelimit-remaining-req-minute": "0", "x-ratelimit-limit-req-minute": "60"}, MINUTE),
        ({"x-ratelimit-remaining-req-minute": "12"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_mistrals_headers(headers: dict[str, str], wait: float | None) -> None:
    assert _adapter().retry_after(headers, time.time()) == wait


async def test_a_429_pauses_the_adapter_as_asked(url: str, sim: MistralSim) -> None:
    job_id = sim.create_batch()["id"]
    for fault, wait in ((Fault("429", retry_after=2), 2.0), (Fault("429"), MINUTE)):
        async with adapter_for("mistral", url) as provider:
            sim.inject(fault)
            started = time.monotonic()
            with pytest.raises(ApiError) as caught:
                await provider.retrieve(job_id)
            assert caught.value.kind == "rate_limited"
            assert caught.value.retry_after == wait
            assert caught.value.code == "1300"
            assert wait - 0.5 <= provider.paused_until - started <= wait + 0.5


def test_config_defaults() -> None:
    config = MistralSourceConfig(provider="mistral")
    assert config.base_url == "https://api.mistral.ai"
    assert config.api_key_env == "MISTRAL_API_KEY"


# -- end to end ----------------------------------------------------------------------------------------


async def test_daemon_discovers_and_follows_mistral_jobs_to_the_end(tmp_path) -> None:
    sim = frozen(MistralSim)
    events, ids, cancelled = await follow_to_the_end(tmp_path, sim, "mistral", cancel_shows="batch.cancelling")
    paths = check_events(events, sim, ids, "mistral", STATUS_MAP)
    for batch_id, path in paths.items():
        final = sim.get(batch_id)
        expected = ["validating"]
        if final["started_at"] is not None:
            expected.append("in_progress")
        if batch_id == cancelled:
            expected.append("cancelling")
        assert path == [*expected, STATUS_MAP[final["status"]]], f"{batch_id}: {path}"
    assert paths[cancelled][-1] == "cancelled"
    assert ["validating", "in_progress", "completed"] in paths.values()
    assert any(e["type"] == "batch.progress" for e in events)  # counts move while a job runs
    for event in events:
        data = event["data"]
        batch = data["batch"]
        counts = {"total": batch["total_requests"], "completed": batch["succeeded_requests"]}
        assert data["request_counts"] == counts | {"failed": batch["failed_requests"]}
        if event["type"] == f"batch.{STATUS_MAP[batch['status']]}" and data["status"] in {"completed", "failed"}:
            assert batch == sim.get(data["id"])  # the provider's object, unchanged


async def test_bulk_refresh_walks_offset_pages_instead_of_retrieving_each(tmp_path) -> None:
    sim = frozen(MistralSim)
    ids = sim.create_batches(250, spread=60)
    sim.create_batches(30)  # newer untracked jobs on the first page
    requests = await bulk_refresh(tmp_path, sim, "mistral", ids)
    assert requests["retrieve"] == 0, requests
    assert requests["list"] <= 3, requests  # 280 jobs, 100 a page


def _adapter() -> MistralProvider:
    config = MistralSourceConfig(provider="mistral", base_url="http://127.0.0.1:9", api_key_env="X")
    return MistralProvider(config, "sk", metrics=Metrics().source("mistral"), pacer=Pacer(10.0))
