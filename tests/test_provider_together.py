"""Together batches: the simulator validated by the official `together` SDK, the adapter against the
simulator, and a daemon following Together jobs to their final statuses."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import together

from poller.config.sources import TogetherSourceConfig
from poller.domain.schedule import Pacer
from poller.domain.snapshot import InvalidSnapshotError
from poller.errors import ApiError, BadResponseError
from poller.metrics import Metrics
from poller.providers.base import Provider
from poller.providers.together import STATUS_MAP, TogetherProvider, epoch_seconds
from poller.sim import Fault, ManualClock, SimProfile, serve
from poller.sim.together import TogetherSim
from tests.helpers import KEY
from tests.provider_checks import adapter_for, bulk_refresh, check_events, follow_to_the_end, frozen

START = 1_750_000_000.0
DAY = 86_400
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


def iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=START)


@pytest.fixture
def sim(clock: ManualClock) -> TogetherSim:
    return TogetherSim(clock=clock, profile=FIXED, seed=3)


@pytest.fixture
async def url(sim: TogetherSim) -> AsyncIterator[str]:
    async with serve(sim) as base:
        yield base


@pytest.fixture
async def client(url: str) -> AsyncIterator[together.AsyncTogether]:
    async with together.AsyncTogether(api_key=KEY, base_url=url, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def adapter(url: str) -> AsyncIterator[Provider]:
    async with adapter_for("together", url) as provider:
        yield provider


def job(**fields: Any) -> dict[str, Any]:
    """A Together BatchJob as the API sends it (the fields of the SDK's model)."""
    body: dict[str, Any] = {
        "id": "3f1e2d4c-5b6a-4789-8abc-def012345678",
        "user_id": "65f0c2a1b3",
        "input_file_id": "file-8c1b",
        "file_size_bytes": 40_960,
        "status": "IN_PROGRESS",
        "job_deadline": "2025-06-16T15:06:40Z",
        "created_at": "2025-06-15T15:06:40.250Z",
        "endpoint": "/v1/chat/completions",
        "progress": 42.5,
        "model_id": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        "output_file_id": None,
        "error_file_id": None,
        "error": None,
        "completed_at": None,
    }
    return body | fields


# -- the SDK's view ------------------------------------------------------------------------------------


async def test_sdk_creates_retrieves_and_cancels(client: together.AsyncTogether, clock: ManualClock) -> None:
    created = await client.batches.create(endpoint="/v1/chat/completions", input_file_id="file-abc")
    assert created.warning is None
    assert created.job is not None
    job_id = created.job.id
    assert job_id
    assert created.job.status == "VALIDATING"
    assert created.job.created_at == datetime.fromtimestamp(START, UTC)
    assert created.job.job_deadline == datetime.fromtimestamp(START + DAY, UTC)
    assert created.job.input_file_id == "file-abc"

    clock.advance(10 + 500)
    running = await client.batches.retrieve(job_id)
    assert running.status == "IN_PROGRESS"
    assert running.progress is not None
    assert 0 < running.progress < 100
    cancelling = await client.batches.cancel(job_id)
    assert cancelling.status == "IN_PROGRESS"  # Together shows no cancelling phase
    clock.advance(30)
    cancelled = await client.batches.retrieve(job_id)
    assert cancelled.status == "CANCELLED"
    assert cancelled.completed_at == datetime.fromtimestamp(clock.now(), UTC)
    assert cancelled.progress == cancelling.progress
    with pytest.raises(together.ConflictError):
        await client.batches.cancel(job_id)


async def test_sdk_lists_every_job_in_one_answer(
    client: together.AsyncTogether, sim: TogetherSim, clock: ManualClock
) -> None:
    ids = sim.create_batches(150)
    clock.advance(5)
    ids += sim.create_batches(60, spread=3_600)
    sim.stats.reset()
    jobs = await client.batches.list()
    assert sorted(j.id or "" for j in jobs) == sorted(ids)
    assert sim.stats.list == 1  # no pagination: one array of every job
    assert all(j.status in {"VALIDATING", "IN_PROGRESS", "COMPLETED"} for j in jobs)
    assert all(j.x_model_id for j in jobs)  # `model_id` on the wire


async def test_sdk_follows_a_lifecycle(client: together.AsyncTogether, sim: TogetherSim, clock: ManualClock) -> None:
    job_id = sim.create_batch()["id"]
    statuses: list[str] = []
    for _ in range(60):
        got = await client.batches.retrieve(job_id)
        if not statuses or statuses[-1] != got.status:
            statuses.append(str(got.status))
        if got.status == "COMPLETED":
            break
        clock.advance(25)
    assert statuses == ["VALIDATING", "IN_PROGRESS", "COMPLETED"]
    assert got.completed_at == datetime.fromtimestamp(START + 1_060, UTC)
    assert got.progress == 100.0
    assert got.output_file_id
    assert got.error_file_id


async def test_sdk_sees_errors(client: together.AsyncTogether, url: str, sim: TogetherSim) -> None:
    with pytest.raises(together.NotFoundError):
        await client.batches.retrieve("3f1e2d4c-0000-0000-0000-000000000000")
    with pytest.raises(together.BadRequestError):
        await client.batches.create(endpoint="/v1/embeddings", input_file_id="file-1")  # type: ignore[arg-type]
    sim.inject(Fault("429"))
    with pytest.raises(together.RateLimitError) as caught:
        await client.batches.list()
    assert caught.value.response.headers["x-ratelimit-remaining"] == "0"
    async with together.AsyncTogether(api_key="wrong-key", base_url=url, max_retries=0) as bad:
        with pytest.raises(together.AuthenticationError):
            await bad.batches.list()


# -- the adapter ---------------------------------------------------------------------------------------


async def test_adapter_retrieves_lists_and_cancels(adapter: Provider, sim: TogetherSim, clock: ManualClock) -> None:
    ids = sim.create_batches(180)
    snap = await adapter.retrieve(ids[5])
    assert (snap.id, snap.status, snap.provider_status) == (ids[5], "validating", "VALIDATING")
    assert snap.created_at == int(START)
    assert snap.expires_at == int(START) + DAY
    assert snap.counts is None  # Together reports a percentage, no counts
    assert snap.raw == sim.get(ids[5])

    page = await adapter.list_page(None)
    assert sorted(s.id for s in page.snapshots) == sorted(ids)
    assert page.next is None
    assert adapter.capabilities.paging == "single"

    clock.advance(10 + 100)
    still = await adapter.cancel(ids[0])
    assert (still.status, still.provider_status) == ("in_progress", "IN_PROGRESS")
    clock.advance(30)
    cancelled = await adapter.retrieve(ids[0])
    assert cancelled.status == "cancelled"
    assert cancelled.entered == {"validating": int(START), "cancelled": int(clock.now())}
    assert adapter.requests == {"retrieve": 2, "list": 1, "cancel": 1}


@pytest.mark.parametrize(("status", "common"), [*STATUS_MAP.items(), ("CANCELLING", None)])
def test_normalize_maps_every_status(status: str, common: str | None) -> None:
    snap = _adapter().normalize(job(status=status))
    assert snap.status == common
    assert snap.provider_status == status


def test_normalize_reads_rfc3339_and_unix_stamps() -> None:
    done = _adapter().normalize(job(status="COMPLETED", completed_at="2025-06-15T16:06:40.999999999+00:00"))
    assert done.created_at == int(START)
    assert done.entered == {"validating": int(START), "completed": int(START) + 3_600}
    assert done.expires_at == int(START) + DAY
    unix = _adapter().normalize(job(created_at=START, job_deadline=int(START) + 60))
    assert (unix.created_at, unix.expires_at) == (int(START), int(START) + 60)
    unset = _adapter().normalize(job(job_deadline="0001-01-01T00:00:00Z"))  # Go's zero time
    assert unset.expires_at is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-06-15T15:06:40Z", 1_750_000_000),
        ("2025-06-15T17:06:40.5+02:00", 1_750_000_000),
        ("2025-06-15T15:06:40", 1_750_000_000),
        (1_750_000_000, 1_750_000_000),
        (1_750_000_000.9, 1_750_000_000),
        (None, None),
        ("0001-01-01T00:00:00Z", None),
    ],
)
def test_epoch_seconds(value: object, expected: int | None) -> None:
    assert epoch_seconds("t", value) == expected


@pytest.mark.parametrize("value", ["yesterday", True, [1], ""])
def test_epoch_seconds_refuses_what_is_not_a_time(value: object) -> None:
    with pytest.raises(InvalidSnapshotError):
        epoch_seconds("t", value)


@pytest.mark.parametrize(
    "broken",
    [
        {"id": None},
        {"status": None},
        {"created_at": None},
        {"created_at": "not a time"},
        {"created_at": "1999-01-01T00:00:00Z"},
        {"completed_at": "2150-01-01T00:00:00Z", "status": "COMPLETED"},
        {"job_deadline": 12},
    ],
)
def test_bad_bodies_are_bad_responses(broken: dict[str, Any]) -> None:
    with pytest.raises(BadResponseError):
        _adapter().normalize(job(**broken))


async def test_bad_answers_over_http(adapter: Provider, sim: TogetherSim) -> None:
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


async def test_a_json_404_is_the_apis_own_not_found(adapter: Provider, sim: TogetherSim) -> None:
    with pytest.raises(ApiError) as caught:
        await adapter.retrieve("3f1e2d4c-0000-0000-0000-000000000000")
    assert (caught.value.status, caught.value.from_api, caught.value.code) == (404, True, "not_found")
    sim.inject(Fault("html404"))
    with pytest.raises(ApiError) as caught:
        await adapter.retrieve("anything")
    assert (caught.value.status, caught.value.from_api) == (404, False)


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "4"}, 4.0),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "0.5", "Retry-After": "2"}, 2.0),
        ({"x-ratelimit-remaining": "3", "x-ratelimit-reset": "4"}, None),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_togethers_headers(headers: dict[str, str], wait: float | None) -> None:
    assert _adapter().retry_after(headers, time.time()) == wait


async def test_a_429_pauses_the_adapter_as_asked(url: str, sim: TogetherSim) -> None:
    job_id = sim.create_batch()["id"]
    for fault, wait in ((Fault("429", retry_after=2), 2.0), (Fault("429", retry_after=None), 1.0)):
        async with adapter_for("together", url) as provider:
            sim.inject(fault)
            started = time.monotonic()
            with pytest.raises(ApiError) as caught:
                await provider.retrieve(job_id)
            assert caught.value.kind == "rate_limited"
            assert caught.value.retry_after == wait
            assert wait - 0.5 <= provider.paused_until - started <= wait + 0.5


def test_config_defaults() -> None:
    config = TogetherSourceConfig(provider="together")
    assert config.base_url == "https://api.together.ai"
    assert config.api_key_env == "TOGETHER_API_KEY"


# -- end to end ----------------------------------------------------------------------------------------


async def test_daemon_discovers_and_follows_together_jobs_to_the_end(tmp_path) -> None:
    sim = frozen(TogetherSim)
    events, ids, cancelled = await follow_to_the_end(tmp_path, sim, "together", cancel_shows=None)
    paths = check_events(events, sim, ids, "together", STATUS_MAP)
    for batch_id, path in paths.items():
        final = STATUS_MAP[sim.get(batch_id)["status"]]
        # Completing implies running; the failed ones failed validation; the cancelled one never ran.
        expected = ["validating", "in_progress", final] if final == "completed" else ["validating", final]
        assert path == expected, f"{batch_id}: {path}"
    assert paths[cancelled] == ["validating", "cancelled"]
    assert ["validating", "in_progress", "completed"] in paths.values()
    for event in events:
        assert event["data"]["request_counts"] is None
        assert "progress" in event["data"]["batch"]
        if event["data"]["status"] in {"completed", "failed", "cancelled"}:
            assert event["data"]["batch"] == sim.get(event["data"]["id"])  # the provider's object, unchanged


async def test_bulk_refresh_reads_the_one_list(tmp_path) -> None:
    sim = frozen(TogetherSim)
    ids = sim.create_batches(120, spread=60)
    sim.create_batches(30)
    requests = await bulk_refresh(tmp_path, sim, "together", ids)
    assert requests["retrieve"] == 0, requests
    assert requests["list"] == 1, requests


def _adapter() -> TogetherProvider:
    config = TogetherSourceConfig(provider="together", base_url="http://127.0.0.1:9", api_key_env="X")
    return TogetherProvider(config, "sk", metrics=Metrics().source("together"), pacer=Pacer(10.0))
