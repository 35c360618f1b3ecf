"""The estimated completion (ETA): from the pace of `request_counts` over a recent window, kept as anchors
in detection's knowledge (so it survives restarts and reads the same in every process), and shown in
in-progress events, the retained MQTT state and `/v1/batches`; absent where it cannot be estimated."""

from __future__ import annotations

import json
from collections import deque
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.config import ServiceConfig
from poller.domain.eta import (
    MAX_ANCHORS,
    MIN_SPAN,
    WINDOW,
    ProgressWindow,
    advance,
    anchor_pairs,
    completion,
    pack_anchors,
)
from poller.domain.events import build_event, decode, encode
from poller.domain.snapshot import Snapshot
from poller.domain.transitions import Knowledge, Policy, detect
from poller.runtime.control import DaemonControl
from poller.runtime.views import batch_view
from poller.service.app import Service
from poller.sim import OpenAISim, SimClock, SimProfile, serve
from poller.sinks.mqtt_payload import state_payload
from poller.store.base import ACTIVE, FINAL, TrackedBatch
from poller.store.codec import knowledge_from_json, knowledge_to_json
from tests.helpers import config_dict, eventually, make_config, make_snapshot, read_jsonl, running

T0 = 1_700_000_000
NOW = T0 + 5_000
POLICY = Policy()


def counts(done: int, total: int = 1000, failed: int = 0) -> dict[str, int]:
    return {"completed": done - failed, "failed": failed, "total": total}


# -- the estimate, pure --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchors", "total", "now", "expected"),
    [
        # 100 requests a minute, 800 left at the last anchor: 8 more minutes
        (((NOW, 100), (NOW + 60, 200)), 1000, NOW + 60, NOW + 60 + 480),
        # asked later, counts unchanged since (maybe not polled since): the estimate holds still
        (((NOW, 100), (NOW + 60, 200)), 1000, NOW + 120, NOW + 60 + 480),
        # asked after it, nothing moved: the pause counts (100 in 700 s), 800 left from now
        (((NOW, 100), (NOW + 60, 200)), 1000, NOW + 700, NOW + 700 + 5600),
        # failed requests are finished too: the anchors count both
        (((NOW, 0), (NOW + 100, 500)), 1000, NOW + 100, NOW + 200),
        # all done: completion is now
        (((NOW, 0), (NOW + 100, 1000)), 1000, NOW + 100, NOW + 100),
    ],
)
def test_completion_follows_the_recent_pace(anchors, total, now, expected) -> None:
    assert completion(pack_anchors(anchors), total, now) == expected


@pytest.mark.parametrize(
    ("anchors", "total", "now"),
    [
        ((), 1000, NOW),  # nothing seen
        (((NOW, 100),), 1000, NOW),  # one sample: no pace yet
        (((NOW, 100), (NOW + MIN_SPAN - 1, 200)), 1000, NOW + MIN_SPAN - 1),  # too short a span
        (((NOW, 100), (NOW + 60, 200)), 0, NOW + 60),  # no total
        (((NOW, 100), (NOW + 60, 200)), 1000, NOW + 60 + WINDOW + 1),  # stalled for a whole window
    ],
)
def test_no_completion_where_it_cannot_be_estimated(anchors, total, now) -> None:
    assert completion(pack_anchors(anchors), total, now) is None


def test_advance_keeps_moves_only_within_the_window_and_a_bounded_count() -> None:
    anchors = advance(b"", NOW, 10)
    assert advance(anchors, NOW + 5, 10) == anchors  # unchanged counts add nothing (the row stays unwritten)
    anchors = advance(anchors, NOW + 10, 20)
    assert anchor_pairs(anchors) == ((NOW, 10), (NOW + 10, 20))
    assert anchor_pairs(advance(anchors, NOW + 20, 5)) == ((NOW + 20, 5),)  # counts went backwards: start over
    later = anchor_pairs(advance(anchors, NOW + WINDOW + 100, 30))
    assert later[0][0] > NOW  # samples older than the window fall out
    many = b""
    for i in range(3 * MAX_ANCHORS):
        many = advance(many, NOW + i, i)
    assert len(anchor_pairs(many)) == MAX_ANCHORS
    assert anchor_pairs(many)[-1] == (NOW + 3 * MAX_ANCHORS - 1, 3 * MAX_ANCHORS - 1)


def test_anchors_are_kept_to_the_millisecond_in_one_object() -> None:
    anchors = advance(advance(b"", NOW + 0.0004, 10), NOW + 60.1236, 20)
    assert anchor_pairs(anchors) == ((NOW, 10), (round(NOW + 60.1236, 3), 20))
    assert isinstance(anchors, bytes)
    assert anchor_pairs(pack_anchors(anchor_pairs(anchors))) == anchor_pairs(anchors)
    assert anchor_pairs(b"") == ()


@settings(max_examples=300, deadline=None, database=None)
@given(
    steps=st.lists(st.tuples(st.floats(0, 600), st.integers(-50, 200)), max_size=40),
    total=st.integers(0, 5000),
    later=st.floats(0, 4000),
)
def test_anchors_stay_bounded_and_ordered_and_an_estimate_is_never_in_the_past(
    steps: list[tuple[float, int]], total: int, later: float
) -> None:
    anchors = b""
    at, finished = float(NOW), 0
    for gap, moved in steps:
        at, finished = at + gap, max(finished + moved, 0)
        anchors = advance(anchors, at, finished)
        pairs = anchor_pairs(anchors)
        assert len(pairs) <= MAX_ANCHORS
        assert [a for a, _ in pairs] == sorted(a for a, _ in pairs)
        assert pairs[-1][1] == finished
    estimate = completion(anchors, total, at + later)
    assert estimate is None or estimate >= at + later


@settings(max_examples=300, deadline=None, database=None)
@given(steps=st.lists(st.tuples(st.floats(0, 900), st.integers(-50, 200)), max_size=40))
def test_packed_anchors_follow_the_rules_of_the_progress_window(steps: list[tuple[float, int]]) -> None:
    anchors = b""
    window = ProgressWindow(deque(maxlen=MAX_ANCHORS))
    at, finished = float(NOW), 0
    for gap, moved in steps:
        at, finished = at + gap, max(finished + moved, 0)
        anchors = advance(anchors, at, finished)
        if not window.samples or window.samples[-1][1] != finished:  # kept only when counts move
            window.add(round(at, 3), finished, 0)
        assert anchor_pairs(anchors) == tuple(window.samples)


# -- in detection's knowledge --------------------------------------------------------------------------


def in_progress(done: int, **fields: object) -> Snapshot:
    return make_snapshot("in_progress", request_counts=counts(done), in_progress_at=T0 + 100, **fields)


def test_knowledge_keeps_anchors_while_in_progress_and_estimates_from_them() -> None:
    known = detect(Knowledge(), make_snapshot("validating"), NOW, POLICY).knowledge
    assert known.anchors == b""
    assert known.eta(NOW) is None
    known = detect(known, in_progress(100), NOW + 60, POLICY).knowledge
    known = detect(known, in_progress(200), NOW + 120, POLICY).knowledge
    assert anchor_pairs(known.anchors)[-2:] == ((NOW + 60, 100), (NOW + 120, 200))
    assert known.eta(NOW + 120) == NOW + 120 + 480
    done = detect(known, make_snapshot("finalizing", request_counts=counts(1000)), NOW + 200, POLICY).knowledge
    assert done.anchors == b""
    assert done.eta(NOW + 200) is None


def test_a_batch_first_seen_part_way_is_estimated_from_when_it_started() -> None:
    # started at T0 + 100 with nothing done; 500 of 1000 done 500 s later: 500 s to go
    known = detect(Knowledge(), in_progress(500), T0 + 600, POLICY).knowledge
    assert anchor_pairs(known.anchors) == ((T0 + 100, 0), (T0 + 600, 500))
    assert known.eta(T0 + 600) == T0 + 1100


def test_anchors_survive_the_store_codec_and_old_rows_read_without_them() -> None:
    known = detect(Knowledge(), in_progress(500), T0 + 600, POLICY).knowledge
    assert knowledge_from_json(knowledge_to_json(known)) == known
    text = knowledge_to_json(known)
    assert json.loads(text)[-1] == [[T0 + 100, 0], [T0 + 600, 500]]  # stored as [time, finished] pairs, as ever
    old = {"status": "in_progress", "seen": ["in_progress"], "sequence": 2, "counts": [500, 0, 1000]}
    assert knowledge_from_json(json.dumps(old)).anchors == b""
    keyed = {**old, "anchors": [[T0 + 100, 0], [T0 + 600.5, 500]]}  # a row of the keyed layout, with anchors
    assert anchor_pairs(knowledge_from_json(json.dumps(keyed)).anchors) == ((T0 + 100, 0), (T0 + 600.5, 500))


# -- where it is shown ---------------------------------------------------------------------------------


def test_an_event_carries_eta_only_when_known() -> None:
    snap = in_progress(500)
    known = detect(Knowledge(), snap, T0 + 600, POLICY)
    [*_, change] = known.changes
    with_eta = build_event("openai", "openai", snap, change, T0 + 600, eta=known.knowledge.eta(T0 + 600))
    assert json.loads(encode(with_eta))["data"]["eta"] == T0 + 1100
    assert decode(encode(with_eta)) == with_eta
    without = build_event("openai", "openai", snap, change, T0 + 600)
    assert "eta" not in json.loads(encode(without))["data"]
    assert decode(encode(without)).data.eta is None
    assert json.loads(state_payload(with_eta))["eta"] == T0 + 1100
    assert json.loads(state_payload(without))["eta"] is None


def test_the_batch_view_shows_eta_for_an_active_batch_in_progress() -> None:
    knowledge = detect(Knowledge(), in_progress(500), T0 + 600, POLICY).knowledge
    row = TrackedBatch("openai", "batch_a", "cli", T0, state=ACTIVE, knowledge=knowledge)
    assert batch_view(row, T0 + 600)["eta"] == T0 + 1100
    assert batch_view(row, T0 + 900)["eta"] == T0 + 1100
    assert batch_view(row, T0 + 1200)["eta"] == T0 + 1200 + 1100  # overdue, nothing moved: 500 done in 1100 s
    row.state = FINAL
    assert batch_view(row, T0 + 600)["eta"] is None


# -- end to end: a daemon polling a simulator, its events and /v1/batches ---------------------------------

#: Simulated seconds per real second: the daemon runs on the simulator's clock, so a pace measured over
#: simulated minutes takes a fraction of a real second.
SPEED = 100.0
STEADY = SimProfile(
    validating_s=(20, 20),
    in_progress_s=(1200, 1200),
    finalizing_s=(10, 10),
    p_failed=0,
    p_expired=0,
    requests=(1000, 1000),
)


async def test_in_progress_events_and_v1_batches_carry_the_estimate(tmp_path: Path) -> None:
    clock = SimClock(speed=SPEED)
    sim = OpenAISim(clock=clock, profile=STEADY, seed=5)
    [batch_id] = sim.create_batches(1)
    record = sim.record(batch_id)
    events = tmp_path / "events.jsonl"
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(serve(sim))
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(events)}])
        raw["source"]["track"] = [batch_id]
        daemon = await stack.enter_async_context(running(make_config(raw), clock=clock.now))
        service = await stack.enter_async_context(Service(DaemonControl(daemon), ServiceConfig(listen="127.0.0.1:0")))
        http = await stack.enter_async_context(aiohttp.ClientSession(base_url=service.url))

        def estimated() -> list[dict[str, Any]]:
            return [e for e in read_jsonl(events) if "eta" in e["data"]]

        await eventually(lambda: bool(estimated()), timeout=30)
        async with http.get("/v1/batches") as resp:
            [view] = (await resp.json())["data"]
    first = read_jsonl(events)[0]
    assert first["type"] == "batch.validating"
    assert "eta" not in first["data"]
    [*_, event] = estimated()
    assert event["data"]["status"] == "in_progress"
    # the simulator's progress is linear: the estimate lands near the end of its in_progress phase
    assert abs(event["data"]["eta"] - record.t_finalizing) < 90
    assert view["id"] == batch_id
    assert view["status"] == "in_progress"
    assert isinstance(view["eta"], int)
    assert abs(view["eta"] - record.t_finalizing) < 90
