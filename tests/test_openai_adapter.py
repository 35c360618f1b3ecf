"""The OpenAI adapter's Batch model and `normalize` against hand-written API objects (fields from the
SDK's batches.d.mts)."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from poller.config import OpenAISourceConfig
from poller.domain.lifecycle import STATUSES
from poller.domain.schedule import Intervals, Pacer
from poller.domain.snapshot import Counts
from poller.domain.transitions import Policy
from poller.errors import BadResponseError
from poller.metrics import Metrics
from poller.polling.tracker import Backoff, Tracker
from poller.providers._http import NestedTooDeepError, parse_json
from poller.providers.base import Page
from poller.providers.openai import OpenAIProvider
from poller.providers.openai_types import Batch
from poller.store import TrackedBatch
from poller.store.codec import dump_body

T0 = 1_714_508_499

FULL: dict[str, Any] = {
    "id": "batch_abc123",
    "object": "batch",
    "endpoint": "/v1/chat/completions",
    "errors": {
        "object": "list",
        "data": [
            {"code": "invalid_json", "line": 7, "message": "Line 7 is not valid JSON.", "param": None},
            {"code": "too_many_tasks", "line": None, "message": "Too many requests.", "param": "body"},
        ],
    },
    "input_file_id": "file-abc123",
    "completion_window": "24h",
    "status": "completed",
    "output_file_id": "file-cvaTdG",
    "error_file_id": "file-HOWS94",
    "created_at": T0,
    "in_progress_at": T0 + 10,
    "expires_at": T0 + 86_400,
    "finalizing_at": T0 + 500,
    "completed_at": T0 + 600,
    "failed_at": None,
    "expired_at": None,
    "cancelling_at": None,
    "cancelled_at": None,
    "request_counts": {"total": 100, "completed": 95, "failed": 5},
    "metadata": {"customer_id": "user_123456789", "batch_description": "Nightly eval job"},
    "model": "gpt-4o-2024-08-06",
    "usage": {
        "input_tokens": 1500,
        "input_tokens_details": {"cached_tokens": 1024},
        "output_tokens": 500,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 2000,
    },
}

MINIMAL: dict[str, Any] = {
    "id": "batch_min",
    "object": "batch",
    "endpoint": "/v1/embeddings",
    "input_file_id": "file-in",
    "completion_window": "24h",
    "status": "validating",
    "created_at": T0,
}


BAD = "batch_poller_bad_responses_total"


def adapter_for(metrics: Metrics) -> OpenAIProvider:
    return OpenAIProvider(
        OpenAISourceConfig(), "sk-test", metrics=metrics.source("openai"), pacer=Pacer(100.0), max_concurrency=1
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def adapter(metrics: Metrics) -> OpenAIProvider:
    return adapter_for(metrics)


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(FULL, id="full"),
        pytest.param(MINIMAL, id="minimal-absent-fields-stay-absent"),
        pytest.param(with_(FULL, metadata=None, errors=None, usage=None), id="explicit-nulls"),
        pytest.param(
            with_(FULL, future_field={"nested": [1, "two", None]}, service_tier="flex"), id="unknown-top-level"
        ),
        pytest.param(
            with_(
                FULL,
                request_counts={"total": 3, "completed": 2, "failed": 1, "skipped": 0},
                errors={
                    "object": "list",
                    "data": [{"code": "x", "line": 1, "message": "m", "param": None, "hint": "h"}],
                },
                usage={"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0, "audio_tokens": 3}},
            ),
            id="unknown-nested",
        ),
        pytest.param(with_(MINIMAL, status="paused", paused_at=T0 + 5), id="unknown-status"),
        pytest.param(with_(FULL, status="cancelled", cancelling_at=T0 + 50, cancelled_at=T0 + 90), id="cancelled"),
    ],
)
def test_wire_round_trips_unchanged(adapter: OpenAIProvider, raw: dict[str, Any]) -> None:
    original = copy.deepcopy(raw)
    batch = Batch.model_validate(raw)
    assert batch.wire() == original
    assert json.loads(json.dumps(batch.wire())) == original
    assert Batch.model_validate_json(json.dumps(raw)).wire() == original
    assert adapter.normalize(raw).raw == original
    assert raw == original  # the input is not mutated


def test_typed_fields_are_parsed() -> None:
    batch = Batch.model_validate(FULL)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed, batch.request_counts.total) == (95, 5, 100)
    assert batch.errors is not None
    assert batch.errors.data is not None
    assert [e.line for e in batch.errors.data] == [7, None]
    assert batch.metadata == {"customer_id": "user_123456789", "batch_description": "Nightly eval job"}
    assert batch.usage is not None
    assert batch.usage.input_tokens_details is not None
    assert batch.usage.input_tokens_details.cached_tokens == 1024


def test_unknown_status_parses() -> None:
    batch = Batch.model_validate(with_(MINIMAL, status="queued_for_gpu"))
    assert batch.status == "queued_for_gpu"


@pytest.mark.parametrize(
    ("raw", "status", "expected"),
    [
        pytest.param(FULL, "validating", T0, id="validating-is-created_at"),
        pytest.param(FULL, "in_progress", T0 + 10, id="in_progress"),
        pytest.param(FULL, "finalizing", T0 + 500, id="finalizing"),
        pytest.param(FULL, "completed", T0 + 600, id="completed"),
        pytest.param(FULL, "failed", None, id="explicit-null"),
        pytest.param(MINIMAL, "in_progress", None, id="absent"),
        pytest.param(with_(MINIMAL, failed_at=T0 + 3), "failed", T0 + 3, id="failed"),
        pytest.param(with_(MINIMAL, expired_at=T0 + 9), "expired", T0 + 9, id="expired"),
        pytest.param(with_(MINIMAL, cancelling_at=T0 + 4), "cancelling", T0 + 4, id="cancelling"),
        pytest.param(with_(MINIMAL, cancelled_at=T0 + 8), "cancelled", T0 + 8, id="cancelled"),
        pytest.param(MINIMAL, "queued_for_gpu", None, id="unknown-status"),
        pytest.param(with_(MINIMAL, weird_at="soon"), "weird", None, id="non-integer-extra"),
    ],
)
def test_entered_at(adapter: OpenAIProvider, raw: dict[str, Any], status: str, expected: int | None) -> None:
    """When the batch entered `status`, by its own timestamps (`created_at` for validating)."""
    assert adapter.normalize(raw).entered_at(status) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(with_(MINIMAL, object="list"), id="wrong-object"),
        pytest.param(with_(MINIMAL, id=""), id="empty-id"),
        pytest.param({k: v for k, v in MINIMAL.items() if k != "status"}, id="missing-status"),
        pytest.param(with_(MINIMAL, request_counts={"total": 1}), id="incomplete-counts"),
    ],
)
def test_rejects_what_is_not_a_batch(adapter: OpenAIProvider, metrics: Metrics, raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Batch.model_validate(raw)
    with pytest.raises(BadResponseError) as caught:
        adapter.normalize(raw)
    assert caught.value.reason == "batch_shape"
    assert metrics.registry.get_sample_value(BAD, {"source": "openai", "reason": "batch_shape"}) == 1.0


# -- normalize ---------------------------------------------------------------------------------------


def test_normalize_maps_a_full_batch() -> None:
    snap = adapter_for(Metrics()).normalize(FULL)
    assert snap.id == "batch_abc123"
    assert snap.status == "completed"
    assert snap.provider_status == "completed"
    assert snap.created_at == T0
    assert snap.expires_at == T0 + 86_400
    assert snap.entered == {"validating": T0, "in_progress": T0 + 10, "finalizing": T0 + 500, "completed": T0 + 600}
    assert snap.counts == Counts(total=100, completed=95, failed=5)
    assert snap.metadata == {"customer_id": "user_123456789", "batch_description": "Nightly eval job"}
    assert snap.endpoint == "/v1/chat/completions"
    assert snap.raw == FULL  # events carry the body as received


def test_normalize_of_a_minimal_batch() -> None:
    snap = adapter_for(Metrics()).normalize(MINIMAL)
    assert (snap.status, snap.counts, snap.expires_at, snap.metadata) == ("validating", None, None, None)
    assert snap.entered == {"validating": T0}
    assert snap.endpoint == "/v1/embeddings"


@pytest.mark.parametrize("status", STATUSES)
def test_openai_statuses_are_the_common_lifecycle(adapter: OpenAIProvider, status: str) -> None:
    snap = adapter.normalize(with_(MINIMAL, status=status))
    assert snap.status == status
    assert snap.provider_status == status


def test_an_unknown_status_normalizes_to_none_and_keeps_its_name(adapter: OpenAIProvider, metrics: Metrics) -> None:
    snap = adapter.normalize(with_(MINIMAL, status="queued_for_gpu", queued_for_gpu_at=T0 + 1))
    assert snap.status is None
    assert snap.provider_status == "queued_for_gpu"
    assert snap.entered == {"validating": T0}
    assert metrics.registry.get_sample_value(BAD, {"source": "openai", "reason": "batch_shape"}) is None


def test_normalize_does_not_mutate_the_body(adapter: OpenAIProvider) -> None:
    raw = copy.deepcopy(FULL)
    adapter.normalize(raw)
    assert raw == FULL


def test_snapshot_checks_the_id_it_asked_for(adapter: OpenAIProvider, metrics: Metrics) -> None:
    assert adapter.snapshot(MINIMAL, "retrieve", "batch_min").id == "batch_min"
    with pytest.raises(BadResponseError) as caught:
        adapter.snapshot(MINIMAL, "retrieve", "batch_other")
    assert caught.value.reason == "wrong_id"
    with pytest.raises(BadResponseError) as caught:
        adapter.snapshot([MINIMAL], "retrieve", "batch_min")
    assert caught.value.reason == "batch_shape"
    assert metrics.registry.get_sample_value(BAD, {"source": "openai", "reason": "wrong_id"}) == 1.0


# -- JSON in and out: orjson where it reads and writes exactly as the standard library ------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"data":[{"id":"a","n":1.5,"ok":true,"x":null,"t":"\\u00e9"}]}', id="plain"),
        pytest.param('{"data":[{"id":"a","metadata":{"k":"\\ud800"}},{"id":"b"}]}', id="lone-surrogate"),
        pytest.param('{"data":[{"id":"a","created_at":123456789012345678901234567890}]}', id="past-64-bits"),
        pytest.param('{"data":[{"id":"a","n":NaN}]}', id="nan"),
        pytest.param('{"id":"batch_12345678901234567890123","n":7}', id="twenty-digits-in-text"),
    ],
)
def test_parse_json_reads_what_the_standard_library_reads(text: str) -> None:
    parsed, expected = parse_json(text.encode()), json.loads(text)
    assert repr(parsed) == repr(expected)  # repr: NaN != NaN, and int stays int
    assert type(parsed) is type(expected)


def test_parse_json_refuses_what_is_not_json_and_names_deep_nesting() -> None:
    with pytest.raises(ValueError, match=r".") as not_json:
        parse_json(b"<html>")
    assert not isinstance(not_json.value, NestedTooDeepError)
    with pytest.raises(NestedTooDeepError):
        parse_json(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"id": "a", "t": "é ✓", "n": [1, 2.5, None, True], "d": {"k": "v"}}, id="plain"),
        pytest.param({"id": "a", "t": "\ud800"}, id="lone-surrogate"),
        pytest.param({"id": "a", "n": 2**70}, id="past-64-bits"),
    ],
)
def test_dump_body_writes_what_the_standard_library_writes(body: dict[str, Any]) -> None:
    assert dump_body(body) == json.dumps(body, separators=(",", ":"), ensure_ascii=False)


# -- list items whose counts alone moved: only the counts are checked ------------------------------------

NOW = float(T0 + 1_000)
RUNNING = with_(FULL, status="in_progress", finalizing_at=None, completed_at=None, errors=None, usage=None)
#: Bodies the poll loop saw before: plain ones (the path taken) and ones `normalize` coerces (not taken).
SEEN_BEFORE = [
    RUNNING,
    with_(RUNNING, metadata=None, request_counts={"failed": 0, "total": 10, "completed": 0}),  # another key order
    with_(RUNNING, metadata={}, expires_at=None, future_field={"nested": [1, "two", None]}),
    with_(MINIMAL, request_counts={"total": 4, "completed": 0, "failed": 0}),
    with_(RUNNING, created_at=float(T0)),  # normalize makes it an int
    with_(RUNNING, in_progress_at=float(T0 + 10)),
    with_(RUNNING, status="paused"),  # unknown: a warning, never taken as seen
    with_(RUNNING, request_counts={"total": 100, "completed": 95, "failed": 5, "skipped": 0}),  # a key besides
]
COUNT_VALUES = st.one_of(
    st.integers(min_value=-3, max_value=200),
    st.sampled_from([10**12, 10**12 + 1, 2**70, True, False, None, 7.0, 7.5, math.nan, "17", "x", [3], {"n": 1}]),
)


def recounts(fast: bool) -> tuple[OpenAIProvider, Metrics, Tracker]:
    """An adapter whose list pages the tracker vouches for, with the counts-only path (`fast`) or without."""
    metrics = Metrics()
    adapter = adapter_for(metrics)
    tracker = Tracker(
        "openai",
        intervals=Intervals(base={"in_progress": 30.0}, growth=2.0, max_interval=300.0),
        policy=Policy(),
        backoff=Backoff(),
        rand=lambda: 0.5,
    )
    tracker.load(
        [TrackedBatch(source="openai", id=i, origin="cli", added_at=0.0) for i in ("batch_abc123", "batch_min")]
    )
    adapter.unchanged = lambda batch_id, item: tracker.unchanged(batch_id, item, NOW)
    adapter.recounted = tracker.recounted if fast else None
    return adapter, metrics, tracker


def exactly(page: Page, metrics: Metrics) -> list[object]:
    """What a page came to, types included (1 == 1.0 == True for `==`), and what was counted as bad."""
    counted = {(s.labels["reason"], s.value) for m in metrics.registry.collect() for s in m.samples if s.name == BAD}
    return [[(repr(s), repr(s.raw)) for s in page.snapshots], page.rejected, page.unchanged, counted]


@settings(max_examples=300, deadline=None, database=None)
@given(
    seen=st.sampled_from(SEEN_BEFORE),
    keys=st.permutations(["total", "completed", "failed"]),
    values=st.lists(COUNT_VALUES, min_size=3, max_size=3),
    shape=st.sampled_from(["counts", "counts-and-status", "extra-key", "missing-key", "null", "not-an-object"]),
)
def test_a_body_whose_counts_alone_moved_makes_the_snapshot_and_errors_of_a_full_check(
    seen: dict[str, Any], keys: list[str], values: list[Any], shape: str
) -> None:
    counts: Any = dict(zip(keys, values, strict=True))
    if shape == "extra-key":
        counts["skipped"] = 0
    elif shape == "missing-key":
        counts.pop(keys[0])
    elif shape == "null":
        counts = None
    elif shape == "not-an-object":
        counts = values
    item = with_(seen, request_counts=counts)
    if shape == "counts-and-status":
        item["status"] = "finalizing"
    outcomes = []
    for fast in (True, False):
        adapter, metrics, tracker = recounts(fast)
        for snap in adapter.page([copy.deepcopy(seen)], None).snapshots:
            tracker.observe(snap, dump_body(snap.raw), NOW - 3, listed=True)
        listed = copy.deepcopy(item)
        page = adapter.page([listed], None)
        assert all(s.raw is listed for s in page.snapshots)  # events carry the body as received
        outcomes.append(exactly(page, metrics))
    assert outcomes[0] == outcomes[1]


def test_only_the_counts_of_a_body_seen_before_are_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter, metrics, tracker = recounts(fast=True)
    [snap] = adapter.page([copy.deepcopy(RUNNING)], None).snapshots
    tracker.observe(snap, dump_body(snap.raw), NOW - 3, listed=True)
    full = adapter.normalize

    def no_full_check(raw: object) -> None:
        raise AssertionError("normalize called for a body whose counts alone moved")

    monkeypatch.setattr(adapter, "normalize", no_full_check)
    moved = with_(RUNNING, request_counts={"total": 100, "completed": 97, "failed": 3})
    [recounted] = adapter.page([moved], None).snapshots
    assert recounted == full(moved)
    assert recounted.counts == Counts(total=100, completed=97, failed=3)
    # Counts that cannot be true go to the full check, which refuses them as it always did (counted once).
    monkeypatch.setattr(adapter, "normalize", full)
    untrue = with_(RUNNING, request_counts={"total": 100, "completed": 97, "failed": 5})
    page = adapter.page([untrue], None)
    assert (page.snapshots, [i for i, _ in page.rejected]) == ([], ["batch_abc123"])
    assert "completed + failed exceeds total" in page.rejected[0][1]
    assert metrics.registry.get_sample_value(BAD, {"source": "openai", "reason": "invalid_value"}) == 1.0
