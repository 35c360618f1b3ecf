"""OpenRouter batches: the simulator validated by the official `openrouter` SDK, the adapter against the
simulator, and a daemon following OpenRouter batches to their final statuses."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openrouter import OpenRouter, errors

from poller.config.sources import OpenRouterSourceConfig
from poller.domain.lifecycle import STATUSES
from poller.domain.schedule import Pacer
from poller.domain.snapshot import Counts
from poller.errors import ApiError, BadResponseError
from poller.metrics import Metrics
from poller.providers.base import Provider
from poller.providers.openrouter import OpenRouterProvider
from poller.sim import Fault, ManualClock, SimProfile, serve
from poller.sim.openrouter import OpenRouterSim
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
    requests=(20, 20),
    request_failure_rate=(0.1, 0.1),
)
#: OpenRouter's statuses are the common lifecycle's.
IDENTITY = {s: s for s in STATUSES}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=START)


@pytest.fixture
def sim(clock: ManualClock) -> OpenRouterSim:
    return OpenRouterSim(clock=clock, profile=FIXED, seed=3)


@pytest.fixture
async def url(sim: OpenRouterSim) -> AsyncIterator[str]:
    async with serve(sim) as base:
        yield base


@pytest.fixture
async def client(url: str) -> AsyncIterator[OpenRouter]:
    async with OpenRouter(api_key=KEY, server_url=url) as sdk:
        yield sdk


@pytest.fixture
async def adapter(url: str) -> AsyncIterator[Provider]:
    async with adapter_for("openrouter", url) as provider:
        yield provider


def batch(**fields: Any) -> dict[str, Any]:
    """An OpenRouter BatchObject as the API sends it (the fields of the SDK's model)."""
    body: dict[str, Any] = {
        "id": "batch_01JXYZ",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "model": "openai/gpt-4o-mini",
        "provider": "OpenAI",
        "completion_window": "24h",
        "status": "in_progress",
        "created_at": 1_750_000_000,
        "expires_at": 1_750_345_600,  # 96 h: the assigned provider's window
        "finalized_at": None,
        "request_counts": {"completed": 7, "failed": 1, "total": 20},
        "error": None,
        "usage": None,
        "results": None,
    }
    return body | fields


REQUESTS = [{"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": "hi"}]}} for i in range(20)]


# -- the SDK's view ------------------------------------------------------------------------------------


async def test_sdk_creates_gets_and_deletes(client: OpenRouter, sim: OpenRouterSim, clock: ManualClock) -> None:
    created = await client.batch.create_batches_async(
        endpoint="/v1/chat/completions", model="openai/gpt-4o-mini", requests=REQUESTS
    )
    assert created.status == "validating"
    assert created.created_at == int(START)
    assert created.expires_at == int(START) + DAY
    assert created.request_counts.total == 0
    assert created.results is None

    clock.advance(10 + 500)
    running = await client.batch.get_batches_async(id=created.id)
    assert running.status == "in_progress"
    assert running.provider == "OpenAI"
    assert 0 < running.request_counts.completed < 20
    with pytest.raises(errors.BatchErrorResponse) as caught:
        await client.batch.delete_async(id=created.id)
    assert caught.value.data.error.code == 409

    clock.advance(1_000)
    done = await client.batch.get_batches_async(id=created.id)
    assert done.status == "completed"
    assert done.finalized_at == int(START) + 1_060
    assert done.results is not None
    assert [r.custom_id for r in done.results] == [r["custom_id"] for r in REQUESTS]
    assert sum(r.error is not None for r in done.results) == done.request_counts.failed == 2
    assert done.usage is not None
    assert done.usage.total_tokens > 0

    deleted = await client.batch.delete_async(id=created.id)
    assert deleted.deletion.openrouter == "deleted"
    with pytest.raises(errors.BatchErrorResponse) as caught:
        await client.batch.get_batches_async(id=created.id)
    assert caught.value.data.error.code == 404
    assert not hasattr(client.batch, "cancel")  # the API has no cancel


async def test_sdk_auto_pages_through_every_batch_newest_first(
    client: OpenRouter, sim: OpenRouterSim, clock: ManualClock
) -> None:
    ids = sim.create_batches(120)
    clock.advance(5)
    ids += sim.create_batches(60, spread=3_600)
    clock.advance(5)
    ids += sim.create_batches(30)
    position = {batch_id: i for i, batch_id in enumerate(ids)}
    expected = sorted(ids, key=lambda i: (sim.get(i)["created_at"], position[i]), reverse=True)

    sim.stats.reset()
    seen: list[str] = []
    page = await client.batch.list_async(limit=50)
    while page is not None:
        seen += [b.id for b in page.result.data]
        assert all(b.results is None for b in page.result.data)
        page = await page.next()
    assert seen == expected
    # The SDK follows `last_id` until a page comes back empty: one request more than the pages.
    assert sim.stats.list == math.ceil(len(ids) / 50) + 1

    completed = await client.batch.list_async(status=["completed"], limit=100)
    assert completed is not None
    assert {b.id for b in completed.result.data} == {i for i in ids if sim.get(i)["status"] == "completed"}


async def test_sdk_sees_errors_in_openrouter_shape(client: OpenRouter, url: str, sim: OpenRouterSim) -> None:
    with pytest.raises(errors.BatchErrorResponse) as caught:
        await client.batch.list_async(limit=101)
    assert caught.value.data.error.code == 400
    sim.inject(Fault("429"))
    with pytest.raises(errors.BatchErrorResponse) as caught:
        await client.batch.list_async()
    assert caught.value.data.error.code == 429
    assert caught.value.headers["X-RateLimit-Remaining"] == "0"
    async with OpenRouter(api_key="wrong-key", server_url=url) as bad:
        with pytest.raises(errors.BatchErrorResponse) as caught:
            await bad.batch.list_async()
    assert caught.value.data.error.code == 401


def test_results_can_be_left_out(clock: ManualClock) -> None:
    sim = OpenRouterSim(clock=clock, profile=FIXED, results=False)
    batch_id = sim.create_batch(outcome="completed")["id"]
    clock.advance(2_000)
    assert sim.get(batch_id)["status"] == "completed"
    assert sim.get(batch_id)["results"] is None


# -- the adapter ---------------------------------------------------------------------------------------


async def test_adapter_retrieves_and_lists(adapter: Provider, sim: OpenRouterSim, clock: ManualClock) -> None:
    ids = sim.create_batches(230)
    snap = await adapter.retrieve(ids[5])
    assert (snap.id, snap.status, snap.provider_status) == (ids[5], "validating", "validating")
    assert snap.expires_at == int(START) + DAY
    assert snap.raw == sim.get(ids[5])

    sim.stats.reset()
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await adapter.list_page(cursor)
        seen += [s.id for s in page.snapshots]
        if page.next is None:
            break
        cursor = page.next
    assert sorted(seen) == sorted(ids)
    assert sim.stats.list == 3

    clock.advance(10 + 1_000 + 20)  # finalizing: retrieves show it, list items do not
    newest = ids[-1]
    assert (await adapter.retrieve(newest)).status == "finalizing"
    first = {s.id: s for s in (await adapter.list_page(None)).snapshots}
    assert {s.provider_status for s in first.values()} == {"in_progress"}
    # The adapter keeps the finer status its retrieve showed, so the list is no step backwards.
    assert first[newest].status == "finalizing"
    assert first[newest].raw["status"] == "in_progress"
    assert {s.status for i, s in first.items() if i != newest} == {"in_progress"}
    clock.advance(100)
    done = await adapter.retrieve(newest)
    assert done.status == "completed"
    assert done.counts == Counts(total=20, completed=18, failed=2)
    assert done.entered == {"validating": int(START), "completed": int(START) + 1_060}
    assert done.raw["results"]  # a retrieve carries the results, unchanged in `raw`


async def test_there_is_no_cancel(adapter: Provider, sim: OpenRouterSim) -> None:
    assert adapter.capabilities.can_cancel is False
    batch_id = sim.create_batch()["id"]
    with pytest.raises(ApiError) as caught:
        await adapter.cancel(batch_id)
    assert caught.value.code == "unsupported"
    assert adapter.requests.total() == 0  # nothing was sent


@pytest.mark.parametrize("status", [*STATUSES, "paused"])
def test_normalize_maps_every_status(status: str) -> None:
    snap = _adapter().normalize(batch(status=status))
    assert snap.status == IDENTITY.get(status)
    assert snap.provider_status == status


def test_normalize_counts_stamps_and_expiry() -> None:
    snap = _adapter().normalize(batch(status="expired", finalized_at=1_750_345_600))
    assert snap.counts == Counts(total=20, completed=7, failed=1)
    assert snap.entered == {"validating": 1_750_000_000, "expired": 1_750_345_600}
    assert snap.expires_at == 1_750_345_600  # later than 24 h: OpenRouter takes the provider's window
    assert _adapter().normalize(batch(expires_at=None)).expires_at is None
    running = _adapter().normalize(batch(finalized_at=None))
    assert running.entered == {"validating": 1_750_000_000}


@pytest.mark.parametrize(
    "broken",
    [
        {"id": None},
        {"status": None},
        {"created_at": "today"},
        {"request_counts": None},
        {"request_counts": {"completed": 30, "failed": 0, "total": 20}},
        {"request_counts": {"completed": -1, "failed": 0, "total": 20}},
        {"expires_at": 5},
        {"created_at": 2**70},
    ],
)
def test_bad_bodies_are_bad_responses(broken: dict[str, Any]) -> None:
    with pytest.raises(BadResponseError):
        _adapter().normalize(batch(**broken))


async def test_bad_answers_over_http(adapter: Provider, sim: OpenRouterSim) -> None:
    batch_id = sim.create_batch()["id"]
    for kind in ("nonjson", "deep_json", "huge_int"):
        sim.inject(Fault(kind))
        with pytest.raises(BadResponseError):
            await adapter.retrieve(batch_id)
    sim.inject(Fault("huge_int", route="list"))
    page = await adapter.list_page(None)
    assert page.snapshots == []
    assert page.rejected[0][0] == batch_id
    sim.inject(Fault("unknown_status", status="paused"))
    assert (await adapter.retrieve(batch_id)).status is None


async def test_a_json_404_is_the_apis_own_not_found(adapter: Provider, sim: OpenRouterSim) -> None:
    with pytest.raises(ApiError) as caught:
        await adapter.retrieve("batch_missing")
    assert (caught.value.status, caught.value.from_api, caught.value.code) == (404, True, "404")
    sim.inject(Fault("html404"))
    with pytest.raises(ApiError) as caught:
        await adapter.retrieve("anything")
    assert (caught.value.status, caught.value.from_api) == (404, False)


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str((1_750_000_000 + 4) * 1000)}, 4.0),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(1_750_000_000 + 3)}, 3.0),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str((1_750_000_000 - 9) * 1000)}, 0.0),
        ({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": str((1_750_000_000 + 4) * 1000)}, None),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "later"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_openrouters_headers(headers: dict[str, str], wait: float | None) -> None:
    assert _adapter().retry_after(headers, 1_750_000_000.0) == wait


async def test_a_429_pauses_the_adapter_as_asked(url: str, sim: OpenRouterSim) -> None:
    batch_id = sim.create_batch()["id"]
    for fault, wait in ((Fault("429", retry_after=2), 2.0), (Fault("429", retry_after=None), 1.0)):
        async with adapter_for("openrouter", url) as provider:
            sim.inject(fault)
            started = time.monotonic()
            with pytest.raises(ApiError) as caught:
                await provider.retrieve(batch_id)
            assert caught.value.kind == "rate_limited"
            assert caught.value.retry_after is not None
            assert wait - 0.5 <= caught.value.retry_after <= wait + 0.5
            assert wait - 0.5 <= provider.paused_until - started <= wait + 0.5


def test_config_defaults() -> None:
    config = OpenRouterSourceConfig(provider="openrouter")
    assert config.base_url == "https://openrouter.ai/api/v1"
    assert config.api_key_env == "OPENROUTER_API_KEY"


# -- end to end ----------------------------------------------------------------------------------------


async def test_daemon_discovers_and_follows_openrouter_batches_to_the_end(tmp_path) -> None:
    sim = frozen(OpenRouterSim)
    events, ids, cancelled = await follow_to_the_end(tmp_path, sim, "openrouter", cancel_shows=None)
    paths = check_events(events, sim, ids, "openrouter", IDENTITY)
    for batch_id, path in paths.items():
        # Finalizing and cancelling show only in retrieves (list items say in_progress): either may be
        # missed, but what was seen comes once and in lifecycle order.
        assert path == sorted(set(path), key=STATUSES.index), f"{batch_id}: {path}"
        final = path[-1]
        if final == "completed":
            assert "in_progress" in path
        if final == "failed":
            assert path == ["validating", "failed"]
    assert paths[cancelled][-1] == "cancelled"
    assert ["validating", "in_progress", "completed"] in [[s for s in p if s != "finalizing"] for p in paths.values()]
    record = sim.record
    for event in events:
        data = event["data"]
        assert data["request_counts"] == {
            k: data["batch"]["request_counts"][k] for k in ("total", "completed", "failed")
        }
        if data["status"] in {"completed", "failed", "cancelled"}:
            # the provider's object unchanged: a retrieve's (results inline) or a list item's
            assert data["batch"] in (sim.get(data["id"]), sim.wire(record(data["id"]), listed=True))


async def test_bulk_refresh_walks_cursor_pages_instead_of_retrieving_each(tmp_path) -> None:
    sim = frozen(OpenRouterSim)
    ids = sim.create_batches(250, spread=60)
    sim.create_batches(30)
    requests = await bulk_refresh(tmp_path, sim, "openrouter", ids)
    assert requests["retrieve"] == 0, requests
    assert requests["list"] <= 3, requests


def _adapter() -> OpenRouterProvider:
    config = OpenRouterSourceConfig(provider="openrouter", base_url="http://127.0.0.1:9", api_key_env="X")
    return OpenRouterProvider(config, "sk", metrics=Metrics().source("openrouter"), pacer=Pacer(10.0))
