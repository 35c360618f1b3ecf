"""The stdout sink writes exactly the canonical bytes (json) or one readable line per event (text)."""

from __future__ import annotations

import io

import pytest

from poller.domain.events import encode
from poller.errors import DeliveryError
from poller.sinks.stdout import StdoutSink
from tests.helpers import make_batch, make_event


def event(status: str, previous: str | None, counts: tuple[int, int, int] | None = None):
    fields = {"request_counts": dict(zip(("completed", "failed", "total"), counts, strict=True))} if counts else {}
    batch = make_batch(status, "batch_1", **fields)
    return make_event(
        source="openai",
        batch=batch,
        event_type=f"batch.{status}",
        status=status,
        previous_status=previous,
        sequence=1,
        created_at=1_700_000_000,
        detected_at=1_700_000_000.5,
    )


async def test_json_lines_are_the_canonical_payload():
    stream = io.BytesIO()
    async with StdoutSink("out", stream) as sink:
        for e in (event("validating", None), event("in_progress", "validating")):
            await sink.send(e, encode(e))
    lines = stream.getvalue().splitlines()
    assert lines == [encode(event("validating", None)), encode(event("in_progress", "validating"))]


@pytest.mark.parametrize(
    ("status", "previous", "counts", "expected"),
    [
        ("validating", None, None, "validating (first seen)"),
        ("in_progress", "validating", (5, 0, 10), "validating → in_progress"),
        ("in_progress", "in_progress", (5, 1, 10), "5/10 done, 1 failed"),
    ],
)
async def test_text_lines_are_readable(status, previous, counts, expected):
    stream = io.BytesIO()
    async with StdoutSink("out", stream, text=True) as sink:
        e = event(status, previous, counts)
        await sink.send(e, encode(e))
    line = stream.getvalue().decode()
    assert line.count("\n") == 1
    assert "batch_1" in line
    assert expected in line


async def test_a_closed_stream_is_a_retryable_outage():
    stream = io.BytesIO()
    async with StdoutSink("out", stream) as sink:
        stream.close()
        e = event("validating", None)
        with pytest.raises(DeliveryError) as info:
            await sink.send(e, encode(e))
    assert info.value.retryable


async def test_text_lines_name_the_source_and_escape_what_the_provider_sent():
    batch = make_batch(
        "in_progress", "batch_\x1b[2Jx\nforged", request_counts={"completed": 1, "failed": 0, "total": 2}
    )
    e = make_event(
        source="anthropic",
        batch=batch,
        event_type="batch.progress",
        status="in_progress",
        previous_status="in_progress",
        sequence=3,
        created_at=1_700_000_000,
        detected_at=1_700_000_000.5,
    )
    stream = io.BytesIO()
    async with StdoutSink("out", stream, text=True) as sink:
        await sink.send(e, encode(e))
    line = stream.getvalue().decode()
    assert line.count("\n") == 1
    assert "\x1b" not in line
    assert "batch_\\x1b[2Jx\\x0aforged" in line
    assert "anthropic" in line
    assert "1/2 done" in line
