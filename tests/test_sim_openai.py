"""The Batch API simulator, driven over real loopback HTTP by the official SDK and by plain aiohttp."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from yarl import URL

from poller.providers.openai_types import Batch
from poller.sim import (
    Fault,
    ManualClock,
    OpenAISim,
    SimClock,
    SimProfile,
    SimRequestError,
    serve,
)

KEY = "sk-sim"
START = 1_750_000_000.0
DAY = 86_400

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


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=START)


@pytest.fixture
def sim(clock: ManualClock) -> OpenAISim:
    return OpenAISim(clock=clock, seed=7, prefixes=("/v1", "/openai", "/openai/v1"))


@pytest.fixture
async def base_url(sim: OpenAISim) -> AsyncIterator[str]:
    async with serve(sim) as url:
        yield url


@pytest.fixture
def root(base_url: str) -> URL:
    return URL(base_url).origin()


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        yield s


async def _create(client: openai.AsyncOpenAI, **metadata: str) -> Any:
    return await client.batches.create(
        input_file_id="file-abc",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata or None,
    )


# -- the SDK's view ------------------------------------------------------------------------------------


async def test_create_and_retrieve(client: openai.AsyncOpenAI, sim: OpenAISim) -> None:
    created = await _create(client, job="nightly")
    assert created.id.startswith("batch_")
    assert created.status == "validating"
    assert created.created_at == int(START)
    assert created.expires_at == created.created_at + DAY
    assert created.metadata == {"job": "nightly"}
    assert created.input_file_id == "file-abc"
    assert created.request_counts is not None
    assert created.request_counts.total == 0

    raw = await client.batches.with_raw_response.retrieve(created.id)
    assert raw.headers["x-request-id"].startswith("req_")
    fetched = raw.parse()
    assert fetched.model_dump() == created.model_dump()
    assert sim.stats.create == 1
    assert sim.stats.retrieve == 1
    Batch.model_validate(sim.get(created.id))


async def test_list_auto_pagination_sees_every_batch_once_newest_first(
    client: openai.AsyncOpenAI, sim: OpenAISim, clock: ManualClock
) -> None:
    ids = sim.create_batches(12)
    clock.advance(5)
    ids += [(await _create(client)).id for _ in range(4)]
    ids += sim.create_batches(9, spread=3_600)  # backdated: they sort among older ones
    clock.advance(5)
    ids += sim.create_batches(5)
    position = {batch_id: i for i, batch_id in enumerate(ids)}
    expected = sorted(ids, key=lambda i: (sim.get(i)["created_at"], position[i]), reverse=True)

    sim.stats.reset()
    seen = [b.id async for b in client.batches.list(limit=7)]

    assert seen == expected
    assert len(set(seen)) == len(ids)
    assert sim.stats.list == math.ceil(len(ids) / 7)


async def test_list_page_shape_and_limits(client: openai.AsyncOpenAI, sim: OpenAISim) -> None:
    sim.create_batches(25)
    page = await client.batches.list()
    assert len(page.data) == 20
    assert page.has_more is True
    raw = await client.batches.with_raw_response.list(limit=3)
    body = json.loads(raw.text)
    assert body["object"] == "list"
    assert body["first_id"] == body["data"][0]["id"]
    assert body["last_id"] == body["data"][-1]["id"]

    for bad in (0, 101):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.batches.list(limit=bad)
        assert caught.value.param == "limit"
    with pytest.raises(openai.BadRequestError):
        await client.batches.list(after="batch_nope")


async def test_empty_list(client: openai.AsyncOpenAI) -> None:
    page = await client.batches.list()
    assert page.data == []
    assert page.has_more is False


async def test_cancel_goes_cancelling_then_cancelled_with_partial_counts(base_url: str, clock: ManualClock) -> None:
    sim = OpenAISim(clock=clock, profile=FIXED)
    async with (
        serve(sim) as url,
        openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as client,
    ):
        batch = await _create(client)
        clock.advance(10 + 500)  # half way through in_progress
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        assert cancelling.cancelling_at == int(clock.now())
        assert cancelling.request_counts is not None
        assert cancelling.request_counts.completed + cancelling.request_counts.failed == 50

        clock.advance(29)
        assert (await client.batches.retrieve(batch.id)).status == "cancelling"
        clock.advance(1)
        done = await client.batches.retrieve(batch.id)
        assert done.status == "cancelled"
        assert done.cancelled_at == cancelling.cancelling_at + 30
        assert done.in_progress_at == batch.created_at + 10
        assert done.finalizing_at is None
        assert done.completed_at is None
        assert done.request_counts == cancelling.request_counts
        assert done.output_file_id is not None

        clock.advance(DAY)  # a cancelled batch stays cancelled
        assert (await client.batches.retrieve(batch.id)).status == "cancelled"
        with pytest.raises(openai.ConflictError) as caught:
            await client.batches.cancel(batch.id)
        assert "cancelled" in caught.value.message


async def test_unknown_id_is_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.batches.retrieve("batch_missing")
    assert caught.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        await client.batches.cancel("batch_missing")


async def test_wrong_or_missing_key_is_refused(base_url: str, sim: OpenAISim) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-wrong-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.batches.list()
    assert caught.value.code == "invalid_api_key"
    assert "sk-wrong-key" not in caught.value.message
    async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{base_url}/batches") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
        assert resp.headers["x-request-id"]
    assert sim.stats.unauthorized == 2


async def test_create_is_validated(client: openai.AsyncOpenAI, base_url: str) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"endpoint": "/v1/chat/completions", "completion_window": "24h"}, "input_file_id"),
        ({"input_file_id": "f", "endpoint": "/v1/images", "completion_window": "24h"}, "endpoint"),
        ({"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "1h"}, "completion_window"),
        (
            {
                "input_file_id": "f",
                "endpoint": "/v1/embeddings",
                "completion_window": "24h",
                "metadata": {str(i): "v" for i in range(17)},
            },
            "metadata",
        ),
        (
            {
                "input_file_id": "f",
                "endpoint": "/v1/embeddings",
                "completion_window": "24h",
                "metadata": {"k": 1},
            },
            "metadata",
        ),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.post("/batches", body=body, cast_to=object)
        assert caught.value.param == param, body
        assert caught.value.type == "invalid_request_error"

    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
        http.post(f"{base_url}/batches", data="{not json") as resp,
    ):
        assert resp.status == 400
        assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}


# -- lifecycles -----------------------------------------------------------------------------------------


async def test_lifecycle_follows_the_clock(clock: ManualClock) -> None:
    sim = OpenAISim(clock=clock, profile=FIXED)
    async with (
        serve(sim) as url,
        openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as client,
    ):
        batch = await _create(client)
        t0 = batch.created_at
        statuses: list[str] = []
        done_counts: list[tuple[int, int]] = []
        last: Any = batch
        for _ in range(60):
            last = await client.batches.retrieve(batch.id)
            if not statuses or statuses[-1] != last.status:
                statuses.append(last.status)
            assert last.request_counts is not None
            done_counts.append((last.request_counts.completed, last.request_counts.failed))
            if last.status == "in_progress":
                assert last.in_progress_at == t0 + 10
                assert last.finalizing_at is None
                assert last.output_file_id is None
                assert last.usage is None
            if last.status == "completed":
                break
            clock.advance(25)

    assert statuses == ["validating", "in_progress", "finalizing", "completed"]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(done_counts))
    assert len(set(done_counts)) > 10  # counts moved gradually, not in one jump
    assert last.in_progress_at == t0 + 10
    assert last.finalizing_at == t0 + 1_010
    assert last.completed_at == t0 + 1_060
    assert last.expires_at == t0 + DAY
    assert last.failed_at is None
    assert last.request_counts.total == 100
    assert (last.request_counts.completed, last.request_counts.failed) == (90, 10)
    assert last.output_file_id is not None
    assert last.error_file_id is not None
    assert last.model
    assert last.usage.total_tokens == last.usage.input_tokens + last.usage.output_tokens > 0


def test_seeded_outcomes_include_failed_and_expired() -> None:
    profile = SimProfile(p_failed=0.1, p_expired=0.05)

    def run() -> list[dict[str, Any]]:
        clock = ManualClock(start=START)
        sim = OpenAISim(clock=clock, profile=profile, seed=42)
        ids = sim.create_batches(200)
        clock.advance(DAY + 1)
        return [sim.get(i) for i in ids]

    batches = run()
    assert batches == run()  # the seed decides everything
    by_status = Counter(b["status"] for b in batches)
    assert set(by_status) == {"completed", "failed", "expired"}
    assert 5 <= by_status["failed"] <= 40
    assert 2 <= by_status["expired"] <= 25
    for b in batches:
        Batch.model_validate(b)
        counts = b["request_counts"]
        match b["status"]:
            case "failed":
                assert b["failed_at"] is not None
                assert b["in_progress_at"] is None
                assert b["errors"]["data"][0]["code"]
                assert counts["total"] == 0
            case "expired":
                assert b["expired_at"] == b["expires_at"]
                assert b["in_progress_at"] is not None
                assert 0 < counts["completed"] + counts["failed"] < counts["total"]
                assert b["completed_at"] is None
            case "completed":
                assert b["in_progress_at"] <= b["finalizing_at"] <= b["completed_at"] <= b["expires_at"]
                assert counts["completed"] + counts["failed"] == counts["total"] >= 10
                assert b["output_file_id"]


def test_programmatic_cancel_rules(clock: ManualClock) -> None:
    sim = OpenAISim(clock=clock, profile=FIXED)
    batch_id = sim.create_batch()["id"]
    assert sim.cancel(batch_id)["status"] == "cancelling"
    with pytest.raises(SimRequestError) as caught:
        sim.cancel(batch_id)
    assert caught.value.status == 409
    finished = sim.create_batch(outcome="completed")["id"]
    clock.advance(2_000)
    with pytest.raises(SimRequestError):
        sim.cancel(finished)
    with pytest.raises(KeyError):
        sim.get("batch_missing")


def test_forced_outcome_and_backdating(clock: ManualClock) -> None:
    sim = OpenAISim(clock=clock, profile=FIXED)
    old = sim.create_batch(outcome="expired", created_at=START - DAY - 5)
    assert old["status"] == "expired"
    assert old["created_at"] == int(START) - DAY - 5
    assert sim.create_batch(outcome="failed", created_at=START - 60)["status"] == "failed"
    assert sim.page(limit=1)["data"][0]["id"] != old["id"]


# -- faults ---------------------------------------------------------------------------------------------


async def test_429_carries_retry_after_headers_then_clears(
    http: aiohttp.ClientSession, base_url: str, sim: OpenAISim
) -> None:
    batch_id = sim.create_batch()["id"]
    sim.inject(Fault("429", count=2, retry_after=1.5))
    for _ in range(2):
        async with http.get(f"{base_url}/batches/{batch_id}") as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "2"
            assert resp.headers["retry-after-ms"] == "1500"
            assert resp.headers["x-request-id"]
            error = (await resp.json())["error"]
            assert error["code"] == "rate_limit_exceeded"
    async with http.get(f"{base_url}/batches/{batch_id}") as resp:
        assert resp.status == 200
    assert sim.stats.faulted == 2
    assert sim.stats.retrieve == 3


async def test_429_reaches_the_sdk_as_rate_limit_error(client: openai.AsyncOpenAI, sim: OpenAISim) -> None:
    sim.inject(Fault("429"))
    with pytest.raises(openai.RateLimitError):
        await client.batches.list()
    await client.batches.list()


async def test_nonjson_unknown_status_and_5xx(
    http: aiohttp.ClientSession, base_url: str, sim: OpenAISim, client: openai.AsyncOpenAI
) -> None:
    batch_id = sim.create_batch()["id"]
    url = f"{base_url}/batches/{batch_id}"

    sim.inject(Fault("nonjson"))
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        with pytest.raises(json.JSONDecodeError):
            json.loads(await resp.text())

    sim.inject(Fault("unknown_status"))
    paused = await client.batches.retrieve(batch_id)
    assert str(paused.status) == "paused"  # the SDK passes a status it does not know through
    assert (await client.batches.retrieve(batch_id)).status == "validating"

    sim.inject(Fault("unknown_status", status="on_hold", route="list"))
    page = await client.batches.list()
    assert {b.status for b in page.data} == {"on_hold"}

    for kind in ("500", "503"):
        sim.inject(Fault(kind))
        async with http.get(url) as resp:
            assert resp.status == int(kind)
            assert (await resp.json())["error"]["type"] == "server_error"
        async with http.get(url) as resp:
            assert resp.status == 200
    assert sim.faults == []


async def test_slow_and_path_filter(http: aiohttp.ClientSession, base_url: str, sim: OpenAISim) -> None:
    first, second = sim.create_batches(2)
    sim.inject(Fault("500", path_contains=second))
    async with http.get(f"{base_url}/batches/{first}") as resp:
        assert resp.status == 200
    async with http.get(f"{base_url}/batches/{second}") as resp:
        assert resp.status == 500

    sim.inject(Fault("slow", delay=0.3))
    started = time.monotonic()
    async with http.get(f"{base_url}/batches/{first}") as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.3


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        Fault("418")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        Fault("429", count=0)


# -- admin routes ---------------------------------------------------------------------------------------


async def test_admin_routes(
    http: aiohttp.ClientSession, root: URL, base_url: str, sim: OpenAISim, clock: ManualClock
) -> None:
    async with http.post(root / "_sim/batches", json={"count": 30, "metadata": {"src": "bench"}}) as resp:
        created = await resp.json()
    assert created["count"] == 30
    assert len(sim) == 30
    assert sim.get(created["ids"][0])["metadata"] == {"src": "bench"}

    fault = {"kind": "503", "count": 1, "retry_after": 3, "path_contains": "/batches"}
    async with http.post(root / "_sim/faults", json=fault) as resp:
        assert resp.status == 200
    async with http.get(f"{base_url}/batches") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "3"
    async with http.post(root / "_sim/faults", json={"kind": "teapot"}) as resp:
        assert resp.status == 400
    async with http.post(root / "_sim/faults", json={"kind": "429", "colour": "red"}) as resp:
        assert resp.status == 400

    async with http.post(root / "_sim/advance", json={"seconds": 90}) as resp:
        assert (await resp.json())["now"] == START + 90
    assert clock.now() == START + 90
    async with http.post(root / "_sim/advance", json={"seconds": -1}) as resp:
        assert resp.status == 400

    async with http.get(f"{base_url}/batches/{created['ids'][0]}") as resp:
        assert resp.status == 200
    async with http.get(root / "_sim/stats") as resp:
        stats = await resp.json()
        assert resp.headers["x-request-id"]
    assert stats["requests"] == {"create": 0, "retrieve": 1, "list": 1, "cancel": 0}
    assert stats["faulted"] == 1
    assert stats["batches"] == 30
    async with http.delete(root / "_sim/stats") as resp:
        assert (await resp.json())["total"] == 0


async def test_advance_needs_a_manual_clock() -> None:
    sim = OpenAISim(clock=SimClock(speed=10))
    async with serve(sim) as url, aiohttp.ClientSession() as http:
        async with http.post(URL(url).origin() / "_sim/advance", json={"seconds": 5}) as resp:
            assert resp.status == 409
        async with http.get(URL(url).origin() / "_sim/clock") as resp:
            assert (await resp.json())["speed"] == 10


async def test_unknown_route_has_openai_error_and_request_id(http: aiohttp.ClientSession, base_url: str) -> None:
    async with http.get(f"{base_url}/nothing-here") as resp:
        assert resp.status == 404
        assert resp.headers["x-request-id"]
        assert (await resp.json())["error"]["message"].startswith("Invalid URL")


# -- Azure shape, clocks, scale, lifecycle of the server ------------------------------------------------


async def test_azure_shape(root: URL, sim: OpenAISim) -> None:
    batch_id = sim.create_batch()["id"]
    async with aiohttp.ClientSession(headers={"api-key": KEY}) as http:
        url = (root / f"openai/batches/{batch_id}").with_query({"api-version": "2024-10-21"})
        async with http.get(url) as resp:
            assert resp.status == 200
            assert (await resp.json())["id"] == batch_id
        async with http.get(root / "openai/v1/batches") as resp:
            assert resp.status == 200
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=str(root), api_key=KEY, api_version="2024-10-21", max_retries=0
    ) as azure:
        assert (await azure.batches.retrieve(batch_id)).id == batch_id


async def test_sim_clock_runs_at_speed() -> None:
    clock = SimClock(speed=1_000, start=START)
    await asyncio.sleep(0.05)
    first = clock.now()
    assert first - START >= 40
    clock.speed = 1.0
    assert clock.now() - first < 5
    with pytest.raises(ValueError, match="positive"):
        SimClock(speed=0)
    with pytest.raises(ValueError, match="forward"):
        ManualClock().advance(-1)


def test_ten_thousand_batches_page_through(clock: ManualClock) -> None:
    sim = OpenAISim(clock=clock)
    sim.create_batches(4_000)
    sim.create_batches(2_000, spread=DAY)
    sim.create_batches(4_000)
    started = time.perf_counter()
    seen: list[str] = []
    after: str | None = None
    while True:
        page = sim.page(limit=100, after=after)
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    elapsed = time.perf_counter() - started
    assert len(seen) == len(set(seen)) == 10_000
    keys = [sim.get(i)["created_at"] for i in seen]
    assert keys == sorted(keys, reverse=True)
    assert elapsed < 10  # O(page) per call; a linear scan per page would be far slower


async def test_serve_releases_the_port(sim: OpenAISim) -> None:
    async with serve(sim) as url:
        port = URL(url).port
        assert url.endswith("/v1")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/v1/batches")
