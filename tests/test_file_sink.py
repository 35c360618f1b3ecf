"""The file sink appends whole JSON lines and fails retryably (then recovers) when it cannot write."""

from __future__ import annotations

import asyncio
import resource
import signal

import pytest

from poller.domain.events import encode
from poller.errors import DeliveryError
from poller.sinks.file import FileSink
from tests.test_stdout_sink import event


async def test_appends_one_line_per_event_concurrently_without_tearing(tmp_path):
    path = tmp_path / "sub" / "events.jsonl"
    events = [event("in_progress", "in_progress", (i, 0, 100)) for i in range(50)]
    async with FileSink("file", path) as sink:
        await asyncio.gather(*(sink.send(e, encode(e)) for e in events))
    lines = path.read_bytes().splitlines()
    assert sorted(lines) == sorted(encode(e) for e in events)


async def test_unwritable_path_is_retryable_and_recovers(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    path = blocker / "events.jsonl"
    e = event("validating", None)
    async with FileSink("file", path) as sink:
        with pytest.raises(DeliveryError) as info:
            await sink.send(e, encode(e))
        assert info.value.retryable
        assert sink.health() == "failing"
        blocker.unlink()
        await sink.send(e, encode(e))
        assert sink.health() == "ok"
    assert path.read_bytes() == encode(e) + b"\n"


async def test_a_write_cut_short_leaves_no_partial_line(tmp_path):
    """A full disk mid-line (here: RLIMIT_FSIZE) must not leave half a JSON line behind."""
    path = tmp_path / "events.jsonl"
    first, second = event("validating", None), event("in_progress", "validating", (1, 0, 2))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    async with FileSink("file", path) as sink:
        await sink.send(first, encode(first))
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(encode(first)) + 1 + 10, hard))
        try:
            with pytest.raises(DeliveryError):
                await sink.send(second, encode(second))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
        await sink.send(second, encode(second))
    assert path.read_bytes().splitlines() == [encode(first), encode(second)]
