"""Snapshots refuse values that cannot be true, and the OpenAI adapter turns such bodies into counted
bad responses, so an absurd body never becomes an event."""

from __future__ import annotations

from typing import Any

import pytest

from poller.config import OpenAISourceConfig
from poller.domain.schedule import Pacer
from poller.domain.snapshot import (
    EARLIEST,
    LATEST,
    MAX_COUNT,
    Counts,
    InvalidSnapshotError,
    Snapshot,
    make_counts,
)
from poller.errors import BadResponseError
from poller.metrics import Metrics
from poller.providers.openai import OpenAIProvider
from tests.helpers import make_batch

T0 = 1_700_000_000
SOURCE = "src"
BAD = "batch_poller_bad_responses_total"


def snapshot(**fields: Any) -> Snapshot:
    base: dict[str, Any] = {
        "id": "batch_a",
        "status": "in_progress",
        "provider_status": "in_progress",
        "created_at": T0,
        "raw": {"id": "batch_a"},
        "entered": {"validating": T0, "in_progress": T0 + 10},
        "counts": Counts(total=10, completed=3, failed=1),
        "expires_at": T0 + 86_400,
    }
    return Snapshot(**(base | fields))


def deep(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


# -- the domain's own checks ---------------------------------------------------------------------------


def test_a_plausible_snapshot_is_accepted() -> None:
    snap = snapshot()
    assert snap.entered_at("in_progress") == T0 + 10
    assert snap.entered_at("finalizing") is None
    assert snap.counts is not None
    assert snap.counts.finished == 4
    assert snap.counts.as_dict() == {"total": 10, "completed": 3, "failed": 1}


@pytest.mark.parametrize(
    "when",
    [
        pytest.param(EARLIEST, id="earliest"),
        pytest.param(LATEST - 1, id="latest"),
        pytest.param(T0, id="now-ish"),
    ],
)
def test_the_edges_of_the_plausible_range_are_accepted(when: int) -> None:
    assert snapshot(created_at=when, entered={"validating": when}, expires_at=when).created_at == when


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        pytest.param({"created_at": -1}, "created_at", id="negative-created_at"),
        pytest.param({"created_at": 0}, "created_at", id="zero-created_at"),
        pytest.param({"created_at": EARLIEST - 1}, "created_at", id="before-2015"),
        pytest.param({"created_at": LATEST}, "created_at", id="year-2100"),
        pytest.param({"created_at": T0 * 1000}, "created_at", id="milliseconds"),
        pytest.param({"created_at": 2**63}, "created_at", id="beyond-int64"),
        pytest.param({"created_at": 2**64 + 5}, "created_at", id="beyond-64-bits"),
        pytest.param({"created_at": 2**200}, "created_at", id="huge"),
        pytest.param({"created_at": None}, "created_at", id="missing-created_at"),
        pytest.param({"created_at": True}, "created_at", id="bool-created_at"),
        pytest.param({"created_at": "1700000000"}, "created_at", id="string-created_at"),
        pytest.param({"created_at": 1.7e9}, "created_at", id="float-created_at"),
        pytest.param({"expires_at": -86_400}, "expires_at", id="negative-expires_at"),
        pytest.param({"expires_at": 2**64}, "expires_at", id="expires_at-beyond-64-bits"),
        pytest.param({"entered": {"in_progress": -5}}, "in_progress_at", id="negative-stamp"),
        pytest.param({"entered": {"completed": 2**70}}, "completed_at", id="stamp-beyond-64-bits"),
        pytest.param({"entered": {"completed": None}}, "completed_at", id="null-stamp"),
        pytest.param({"entered": {"paused": T0}}, "entered", id="stamp-of-no-lifecycle-status"),
        pytest.param({"id": ""}, "id", id="empty-id"),
        pytest.param({"counts": Counts(total=10, completed=-1, failed=0)}, "request_counts.completed", id="neg-done"),
        pytest.param({"counts": Counts(total=-10, completed=0, failed=0)}, "request_counts.total", id="neg-total"),
        pytest.param({"counts": Counts(total=10, completed=0, failed=-2)}, "request_counts.failed", id="neg-failed"),
        pytest.param({"counts": Counts(total=10, completed=8, failed=3)}, "request_counts", id="more-done-than-total"),
        pytest.param(
            {"counts": Counts(total=2**64, completed=0, failed=0)}, "request_counts.total", id="count-64-bits"
        ),
    ],
)
def test_out_of_range_values_are_refused(fields: dict[str, Any], field_name: str) -> None:
    with pytest.raises(InvalidSnapshotError) as caught:
        snapshot(**fields)
    assert caught.value.field == field_name
    assert str(caught.value).startswith(f"{field_name}: ")


@pytest.mark.parametrize(
    ("raw", "field_name"),
    [
        pytest.param({"id": "batch_a", "x": deep(300)}, "raw", id="nested-deeper-than-events-can-carry"),
        pytest.param({"id": "batch_a", "metadata": {"k": "\udc80"}}, "raw", id="lone-surrogate-value"),
        pytest.param({"id": "batch_a", "\ud800": 1}, "raw", id="lone-surrogate-key"),
    ],
)
def test_a_body_no_event_could_carry_is_refused(raw: dict[str, Any], field_name: str) -> None:
    with pytest.raises(InvalidSnapshotError) as caught:
        snapshot(raw=raw)
    assert caught.value.field == field_name


def test_a_body_of_ordinary_depth_is_accepted() -> None:
    assert snapshot(raw={"id": "batch_a", "x": deep(20), "é": ["ü", 1, None, 2.5, True]}).raw["é"][0] == "ü"


@pytest.mark.parametrize(
    ("counts", "problem"),
    [
        pytest.param((0, 0, 0), None, id="empty"),
        pytest.param((10, 7, 3), None, id="all-finished"),
        pytest.param((MAX_COUNT, MAX_COUNT, 0), None, id="max"),
        pytest.param((MAX_COUNT + 1, 0, 0), "request_counts.total", id="beyond-max"),
        pytest.param((-1, 0, 0), "request_counts.total", id="negative-total"),
        pytest.param((10, -1, 0), "request_counts.completed", id="negative-completed"),
        pytest.param((10, 0, -1), "request_counts.failed", id="negative-failed"),
        pytest.param((10, 6, 5), "request_counts", id="finished-exceeds-total"),
        pytest.param((True, 0, 0), "request_counts.total", id="bool"),
        pytest.param(("10", 0, 0), "request_counts.total", id="string"),
        pytest.param((10.0, 0, 0), "request_counts.total", id="float"),
    ],
)
def test_make_counts(counts: tuple[Any, Any, Any], problem: str | None) -> None:
    total, completed, failed = counts
    if problem is None:
        assert make_counts(total, completed, failed) == Counts(total, completed, failed)
    else:
        with pytest.raises(InvalidSnapshotError) as caught:
            make_counts(total, completed, failed)
        assert caught.value.field == problem


# -- the OpenAI adapter ------------------------------------------------------------------------------


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def adapter(metrics: Metrics) -> OpenAIProvider:
    return OpenAIProvider(
        OpenAISourceConfig(), "sk-test", metrics=metrics.source(SOURCE), pacer=Pacer(100.0), max_concurrency=1
    )


def body(**fields: Any) -> dict[str, Any]:
    return make_batch("in_progress", request_counts={"total": 10, "completed": 3, "failed": 1}).wire() | fields


def bad_count(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value(BAD, {"source": SOURCE, "reason": reason}) or 0.0


INVALID_BODIES = [
    pytest.param({"created_at": -1}, id="negative-created_at"),
    pytest.param({"created_at": 12}, id="created_at-in-1970"),
    pytest.param({"created_at": 2**64 + 1}, id="created_at-beyond-64-bits"),
    pytest.param({"created_at": T0 * 1000}, id="created_at-in-milliseconds"),
    pytest.param({"in_progress_at": -5}, id="negative-in_progress_at"),
    pytest.param({"completed_at": 2**70}, id="completed_at-beyond-64-bits"),
    pytest.param({"cancelled_at": 4_102_444_800}, id="cancelled_at-in-2100"),
    pytest.param({"expires_at": -1}, id="negative-expires_at"),
    pytest.param({"expires_at": 2**63}, id="expires_at-beyond-int64"),
    pytest.param({"request_counts": {"total": 10, "completed": -1, "failed": 0}}, id="negative-completed"),
    pytest.param({"request_counts": {"total": -10, "completed": 0, "failed": 0}}, id="negative-total"),
    pytest.param({"request_counts": {"total": 10, "completed": 9, "failed": 2}}, id="more-finished-than-total"),
    pytest.param({"request_counts": {"total": 2**64, "completed": 0, "failed": 0}}, id="count-beyond-64-bits"),
    pytest.param({"created_at": True}, id="bool-created_at"),
    pytest.param({"created_at": "1700000000"}, id="string-created_at"),
    pytest.param({"in_progress_at": False}, id="bool-stamp"),
    pytest.param({"request_counts": {"total": True, "completed": False, "failed": 0}}, id="bool-counts"),
    pytest.param({"request_counts": {"total": "10", "completed": "3", "failed": "1"}}, id="string-counts"),
    pytest.param({"future": deep(300)}, id="nested-too-deep-for-an-event"),
    pytest.param({"metadata": {"k": "\udc80"}}, id="lone-surrogate"),
]


@pytest.mark.parametrize("fields", INVALID_BODIES)
def test_normalize_turns_an_invalid_value_into_a_counted_bad_response(
    adapter: OpenAIProvider, metrics: Metrics, fields: dict[str, Any]
) -> None:
    with pytest.raises(BadResponseError) as caught:
        adapter.normalize(body(**fields))
    assert caught.value.reason == "invalid_value"
    assert caught.value.kind == "bad_response"
    assert "invalid value" in str(caught.value)
    assert bad_count(metrics, "invalid_value") == 1.0
    # the metric is the source's: another source's series stays empty
    assert metrics.registry.get_sample_value(BAD, {"source": "other", "reason": "invalid_value"}) is None


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(body(object="list"), id="wrong-object"),
        pytest.param({k: v for k, v in body().items() if k != "created_at"}, id="missing-created_at"),
        pytest.param(body(created_at=1.5e9 + 0.5), id="fractional-created_at"),
        pytest.param(body(expires_at=float("inf")), id="infinite-expires_at"),
        pytest.param(body(request_counts={"total": 1}), id="incomplete-counts"),
        pytest.param(body(id=7), id="numeric-id"),
        pytest.param(body(metadata={"k": 1}), id="metadata-not-strings"),
    ],
)
def test_normalize_turns_what_is_not_a_batch_into_a_counted_bad_response(
    adapter: OpenAIProvider, metrics: Metrics, raw: dict[str, Any]
) -> None:
    with pytest.raises(BadResponseError) as caught:
        adapter.normalize(raw)
    assert caught.value.reason == "batch_shape"
    assert bad_count(metrics, "batch_shape") == 1.0


def test_a_plausible_body_is_not_counted(adapter: OpenAIProvider, metrics: Metrics) -> None:
    snap = adapter.normalize(body(expires_at=T0 + 86_400, in_progress_at=T0 + 10))
    assert snap.counts == Counts(total=10, completed=3, failed=1)
    assert snap.entered == {"validating": T0, "in_progress": T0 + 10}
    assert bad_count(metrics, "invalid_value") == 0.0
    assert bad_count(metrics, "batch_shape") == 0.0


def test_a_list_page_skips_and_counts_the_invalid_items(adapter: OpenAIProvider, metrics: Metrics) -> None:
    good = body(id="batch_good")
    page = adapter.page(
        [good, body(id="batch_neg", created_at=-1), "nonsense", body(id="batch_huge", expires_at=2**65)], None
    )
    assert [s.id for s in page.snapshots] == ["batch_good"]
    assert [batch_id for batch_id, _ in page.rejected] == ["batch_neg", None, "batch_huge"]
    assert bad_count(metrics, "invalid_value") == 2.0
    assert bad_count(metrics, "batch_shape") == 1.0
