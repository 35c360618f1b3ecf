"""Property: whatever a server sends as a batch, the pipeline either refuses it as a bad response or
records exactly the events detection finds, and never an event built from values that cannot be true.

Mutated Batch bodies (fields deleted, types swapped, huge and negative numbers, deep nesting, random and
non-Unicode text) go through the OpenAI adapter's `normalize`, the tracker (which runs `detect`), the
recorder and a real SQLite store, as a poll would. Validity is judged here from the API's contract, not
by calling the code under test.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.config import OpenAISourceConfig
from poller.domain.events import build_event
from poller.domain.lifecycle import STATUSES
from poller.domain.schedule import Intervals, Pacer
from poller.domain.snapshot import EARLIEST, LATEST, MAX_COUNT, MAX_DEPTH, Snapshot
from poller.domain.transitions import Policy, detect
from poller.errors import BadResponseError
from poller.metrics import Metrics
from poller.polling.recorder import Recorder
from poller.polling.tracker import Backoff, Tracker
from poller.providers.openai import OpenAIProvider
from poller.store import TrackedBatch, open_store
from poller.store.base import Store
from poller.store.codec import dump_body

SOURCE = "props"
T0 = 1_700_000_000
POLICY = Policy(progress=True, progress_interval=60.0, stall_after=250.0, expiry_warning=3600.0)
STAMPED = [s for s in STATUSES if s != "validating"]
INT_FIELDS = ["created_at", "expires_at", *(f"{s}_at" for s in STAMPED)]
REQUIRED_TEXT = ["endpoint", "input_file_id", "completion_window", "status"]
OPTIONAL_TEXT = ["error_file_id", "output_file_id", "model"]
COUNT_KEYS = ["total", "completed", "failed"]
MISSING = object()

# -- what a body is, by the API's contract ---------------------------------------------------------


class Invalid(Exception):  # noqa: N818 - a verdict, not an error
    pass


def has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def depth_of(value: Any) -> int:
    """Levels of containers (the body itself is level 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
            stack.extend((k, level) for k in item)
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
        elif isinstance(item, str) and has_lone_surrogate(item):
            raise Invalid("text that is not Unicode")
    return deepest


def as_int(value: Any, name: str) -> int:
    """An integer field: a JSON integer (or an integral float); strings and booleans are not numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"{name} is not a number")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise Invalid(f"{name} is not an integer")
        return int(value)
    return int(value)


def as_time(value: Any, name: str) -> int:
    when = as_int(value, name)
    if not EARLIEST <= when < LATEST:
        raise Invalid(f"{name} is not a plausible time")
    return when


def judge(body: Any) -> dict[str, Any]:
    """What a valid body means (the fields a snapshot must carry), or Invalid."""
    if not isinstance(body, dict):
        raise Invalid("not an object")
    if depth_of(body) > MAX_DEPTH:
        raise Invalid("nested too deeply")
    if body.get("object", MISSING) != "batch":
        raise Invalid("not a batch object")
    batch_id = body.get("id", MISSING)
    if not isinstance(batch_id, str) or not batch_id:
        raise Invalid("no id")
    for name in REQUIRED_TEXT:
        if not isinstance(body.get(name, MISSING), str):
            raise Invalid(f"{name} is not text")
    for name in OPTIONAL_TEXT:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise Invalid(f"{name} is not text")
    if "created_at" not in body:
        raise Invalid("no created_at")
    meaning: dict[str, Any] = {"id": batch_id, "status": body["status"], "created_at": as_time(body["created_at"], "c")}
    entered = {"validating": meaning["created_at"]}
    for status in STAMPED:
        value = body.get(f"{status}_at")
        if value is not None:
            entered[status] = as_time(value, f"{status}_at")
    meaning["entered"] = entered
    expires = body.get("expires_at")
    meaning["expires_at"] = None if expires is None else as_time(expires, "expires_at")
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise Invalid("metadata is not text to text")
    meaning["metadata"] = metadata
    errors = body.get("errors")
    if errors is not None and (not isinstance(errors, dict) or errors.get("data") is not None):
        raise Invalid("errors is not an error list")  # (the generated ones never carry a `data` list)
    rc = body.get("request_counts")
    if rc is None:
        meaning["counts"] = None
    else:
        if not isinstance(rc, dict) or any(k not in rc for k in COUNT_KEYS):
            raise Invalid("request_counts incomplete")
        total, completed, failed = (as_int(rc[k], k) for k in COUNT_KEYS)
        if not all(0 <= n <= MAX_COUNT for n in (total, completed, failed)) or completed + failed > total:
            raise Invalid("request_counts impossible")
        meaning["counts"] = {"total": total, "completed": completed, "failed": failed}
    return meaning


# -- bodies and their mutations ----------------------------------------------------------------------

plausible = st.integers(T0 - 10**6, T0 + 10**6)
surrogate = st.integers(0xD800, 0xDFFF).map(chr)  # valid JSON ("\\ud800"), not valid Unicode
weird_text = st.one_of(
    st.text(max_size=8),
    st.lists(st.one_of(st.characters(), surrogate), min_size=1, max_size=4).map("".join),
    st.sampled_from(["", "\ud800", "x\udfff", "1700000000", "-1", "null", "batch"]),
)
huge = st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 2**100, 10**30, -(2**63) - 1])
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    weird_text,
)
#: Keys of generated objects never name a field of the Batch model, so where they land stays easy to judge.
junk_key = st.text(alphabet="xyzé\U0001f600", max_size=3)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(junk_key, inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    # the body is one level, so MAX_DEPTH - 1 levels below it is the deepest allowed; JSON encoders stop near 255
    levels = draw(st.sampled_from([1, 10, MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, 300, 1500]))
    value: Any = draw(json_scalar)
    as_list = draw(st.booleans())  # one draw, not one per level: deep values must stay cheap to generate
    for _ in range(levels):
        value = [value] if as_list else {"a": value}
    return value


MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "swap": st.one_of(
        st.sampled_from([True, False, "1700000000", "12", 1.7e9, 1.5e9 + 0.5, float("inf"), None, [], {}]),
        st.booleans(),
        weird_text,
        st.none(),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(junk_key, st.integers(), max_size=2),
        st.floats(allow_nan=True, allow_infinity=True),
    ),
    "huge": huge,
    "negative": st.integers(max_value=-1),
    "deep": deep(),
    "string": weird_text,
    "junk": json_value,
    "plausible": plausible,
}
#: Where mutations land; numbers, counts and an unknown field (which nothing types) weigh the most.
TARGETS = [
    *INT_FIELDS,
    *(f"request_counts.{k}" for k in COUNT_KEYS),
    *["future_field"] * 4,
    "metadata.team",
    "id",
    "object",
    *REQUIRED_TEXT,
    *OPTIONAL_TEXT,
    *INT_FIELDS,
    "metadata",
    "request_counts",
    *(f"request_counts.{k}" for k in COUNT_KEYS),
    "request_counts.extra",
    "metadata.team",
    "errors",
    "future_field",
]


@st.composite
def batch_body(draw: st.DrawFn, batch_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "created_at": T0,
        "status": draw(st.sampled_from([*STATUSES, "paused", "queued_for_gpu"])),
    }
    for status in STAMPED:
        choice = draw(st.sampled_from(["absent", "null", "stamped"]))
        if choice != "absent":
            body[f"{status}_at"] = None if choice == "null" else T0 + draw(st.integers(1, 5_000))
    if draw(st.booleans()):
        total = draw(st.integers(0, 1_000))
        completed = draw(st.integers(0, total))
        body["request_counts"] = {
            "total": total,
            "completed": completed,
            "failed": draw(st.integers(0, total - completed)),
        }
    if draw(st.booleans()):
        body["expires_at"] = T0 + draw(st.integers(0, 100_000))
    if draw(st.booleans()):
        body["metadata"] = draw(st.dictionaries(st.sampled_from(["team", "job", "é"]), st.text(max_size=6), max_size=2))
    for _ in range(draw(st.integers(0, 4))):
        mutate(body, draw(st.sampled_from(TARGETS)), draw(st.sampled_from(["delete", *MUTATIONS])), draw)
    return body


def mutate(body: dict[str, Any], target: str, op: str, draw: st.DrawFn) -> None:
    parent, key = body, target
    if "." in target:
        head, key = target.split(".", 1)
        if not isinstance(body.get(head), dict):
            return
        parent = body[head]
    if op == "delete":
        parent.pop(key, None)
    else:
        parent[key] = draw(MUTATIONS[op])


# -- the pipeline ------------------------------------------------------------------------------------


class Pipeline:
    """A source's poll path over a real store: normalize, observe (detect), record."""

    def __init__(self, store: Store, loop: asyncio.Runner) -> None:
        self.store, self.loop = store, loop
        self.metrics = Metrics()
        self.adapter = OpenAIProvider(
            OpenAISourceConfig(), "sk-test", metrics=self.metrics.source(SOURCE), pacer=Pacer(100.0), max_concurrency=1
        )
        self.tracker = Tracker(
            SOURCE,
            intervals=Intervals(base={}, growth=2.0, max_interval=300.0, default=10.0),
            policy=POLICY,
            backoff=Backoff(),
            rand=lambda: 0.5,
        )
        self.recorder = Recorder(store, lambda _t, _m, _s: ["stdout", "file"], self.metrics)
        self.recorded = 0

    def track(self, batch_id: str) -> None:
        self.loop.run(self.store.track(SOURCE, [batch_id], "cli", T0))
        self.tracker.add(TrackedBatch(source=SOURCE, id=batch_id, origin="cli", added_at=T0))

    def events(self, batch_id: str) -> list[dict[str, Any]]:
        return self.loop.run(self.store.events_for(SOURCE, batch_id))

    def poll(self, tracked_id: str, body: dict[str, Any], now: float) -> None:
        bad_before = self.bad_responses()
        try:
            meaning = judge(body)
        except Invalid:
            meaning = None
        before = self.events(tracked_id)
        try:
            snap = self.adapter.normalize(body)
        except BadResponseError:
            assert meaning is None, f"a valid body was refused: {body!r:.300}"
            assert self.bad_responses() == bad_before + 1  # counted once, as a bad response
            assert self.events(tracked_id) == before
            return
        assert meaning is not None, f"an invalid body was accepted: {body!r:.300}"
        self.check_snapshot(snap, body, meaning)
        self.observe(tracked_id, snap, now, before)

    def check_snapshot(self, snap: Snapshot, body: dict[str, Any], meaning: dict[str, Any]) -> None:
        assert snap.raw is body
        assert snap.id == meaning["id"]
        assert snap.provider_status == meaning["status"]
        assert snap.status == (meaning["status"] if meaning["status"] in STATUSES else None)
        assert snap.created_at == meaning["created_at"]
        assert dict(snap.entered) == meaning["entered"]
        assert snap.expires_at == meaning["expires_at"]
        assert snap.metadata == meaning["metadata"]
        assert (None if snap.counts is None else snap.counts.as_dict()) == meaning["counts"]

    def observe(self, tracked_id: str, snap: Snapshot, now: float, before: list[dict[str, Any]]) -> None:
        tracked = self.tracker.batches[tracked_id]
        known, was_active = tracked.knowledge, tracked.state == "active"
        expected = detect(known, snap, now, POLICY)
        obs = self.tracker.observe(snap, dump_body(snap.raw), now)
        if snap.id != tracked_id or not was_active:
            assert obs is None  # another batch's id, or a batch already final: nothing to record
            return
        assert obs is not None
        if expected.warning is not None:
            assert (obs.warning, obs.row, obs.changes) == (expected.warning, None, [])
        else:
            assert obs.changes == expected.changes
        recorded = self.loop.run(self.recorder.record(SOURCE, "openai", [obs], now))
        assert recorded.conflicts == ()
        after = self.events(tracked_id)
        new = after[len(before) :]
        assert after[: len(before)] == before
        built = [build_event(SOURCE, "openai", snap, c, now) for c in expected.changes if expected.warning is None]
        assert [(e["id"], e["type"], e["data"]["sequence"], e["created_at"]) for e in new] == [
            (e.id, e.type, e.data.sequence, e.created_at) for e in built
        ]
        for event in new:
            assert EARLIEST <= event["created_at"] < LATEST
            assert event["data"]["status"] in STATUSES
        assert recorded.enqueued == 2 * len(new)
        self.recorded += len(new)
        row = self.loop.run(self.store.batch(SOURCE, tracked_id))
        assert row is not None
        assert row.knowledge == self.tracker.batches[tracked_id].knowledge

    def bad_responses(self) -> float:
        total = 0.0
        for metric in self.metrics.registry.collect():
            if metric.name == "batch_poller_bad_responses":
                total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        return total

    def events_metric(self) -> float:
        total = 0.0
        for metric in self.metrics.registry.collect():
            if metric.name == "batch_poller_events":
                total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        return total


def check_history(events: list[dict[str, Any]]) -> None:
    """Over a batch's whole life: sequences strictly increase, each status announced at most once."""
    sequences = [e["data"]["sequence"] for e in events]
    assert sequences == sorted(set(sequences))
    announced = [e["data"]["status"] for e in events if e["type"] == f"batch.{e['data']['status']}"]
    assert len(announced) == len(set(announced))
    assert len({e["id"] for e in events}) == len(events)


@contextmanager
def pipeline_on(path: Path) -> Iterator[Pipeline]:
    """A pipeline over a real SQLite store at `path`, driven from synchronous code through one event loop."""
    with asyncio.Runner() as loop:
        store = open_store(path)
        loop.run(store.__aenter__())
        try:
            yield Pipeline(store, loop)
        finally:
            loop.run(store.__aexit__(None, None, None))


def test_mutated_bodies_become_bad_responses_or_exactly_the_detected_events(tmp_path: Path) -> None:
    ids = itertools.count()
    # One store for every example (opening one per example would dominate the run); each example has its own batch.
    with pipeline_on(tmp_path / "state.db") as pipeline:

        @settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(data=st.data())
        def poll_a_batch(data: st.DataObject) -> None:
            batch_id = f"batch_{next(ids)}"
            pipeline.track(batch_id)
            polls = data.draw(st.lists(batch_body(batch_id), min_size=1, max_size=4))
            for i, body in enumerate(polls):
                pipeline.poll(batch_id, body, float(T0 + 10_000 + 100 * i))
            check_history(pipeline.events(batch_id))

        poll_a_batch()
        assert pipeline.events_metric() == pipeline.recorded
        assert pipeline.recorded > 0  # the valid bodies did get through


def nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"a": value}
    return value


def plain(batch_id: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "created_at": T0,
        "status": "in_progress",
        "request_counts": {"total": 10, "completed": 2, "failed": 0},
    }
    return body | fields


#: Bodies that once got through `normalize` and then either broke recording or made events of nonsense.
REGRESSIONS = [
    pytest.param({"future": nested(300)}, id="deeper-than-an-event-can-carry"),
    pytest.param({"future": nested(1500)}, id="deeper-than-the-json-encoder-goes"),
    pytest.param({"future": "\udc80"}, id="lone-surrogate-in-an-unknown-field"),
    pytest.param({"metadata": {"team": "x\ud800"}}, id="lone-surrogate-in-metadata"),
    pytest.param({"endpoint": "\ud800"}, id="lone-surrogate-in-endpoint"),
    pytest.param({"created_at": "1700000000"}, id="created_at-as-text"),
    pytest.param({"in_progress_at": "1700000010"}, id="stamp-as-text"),
    pytest.param({"request_counts": {"total": True, "completed": True, "failed": False}}, id="counts-as-booleans"),
    pytest.param({"request_counts": {"total": "10", "completed": "2", "failed": "0"}}, id="counts-as-text"),
    pytest.param({"created_at": 2**64 + 1}, id="created_at-beyond-64-bits"),
    pytest.param({"request_counts": {"total": -1, "completed": 0, "failed": 0}}, id="negative-total"),
]


@pytest.mark.parametrize("fields", REGRESSIONS)
def test_a_body_that_cannot_be_true_is_a_bad_response_and_records_nothing(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    with pipeline_on(tmp_path / "state.db") as pipeline:
        pipeline.track("batch_r")
        body = plain("batch_r", **fields)
        with pytest.raises(Invalid):
            judge(body)
        pipeline.poll("batch_r", body, float(T0 + 10_000))  # asserts the refusal and that nothing was recorded
        assert pipeline.bad_responses() == 1
        assert pipeline.events("batch_r") == []
        # the next, sound answer is recorded as usual
        pipeline.poll("batch_r", plain("batch_r"), float(T0 + 10_100))
        assert [e["type"] for e in pipeline.events("batch_r")] == ["batch.validating", "batch.in_progress"]


def test_judge_agrees_with_itself_on_plain_bodies() -> None:
    """The oracle's own sanity: a clean body is valid, and each kind of damage makes it invalid."""
    clean: dict[str, Any] = {
        "id": "b",
        "object": "batch",
        "endpoint": "/v1/x",
        "input_file_id": "f",
        "completion_window": "24h",
        "created_at": T0,
        "status": "validating",
    }
    assert judge(clean)["created_at"] == T0
    nested: Any = 0
    for _ in range(MAX_DEPTH):
        nested = [nested]
    for damaged in (
        clean | {"created_at": -1},
        clean | {"created_at": "1700000000"},
        clean | {"request_counts": {"total": 1, "completed": 1, "failed": 1}},
        clean | {"x": nested},
        clean | {"id": "\ud800"},
        {k: v for k, v in clean.items() if k != "endpoint"},
    ):
        try:
            judge(damaged)
        except Invalid:
            continue
        raise AssertionError(f"judged valid: {damaged!r:.200}")
    assert judge(clean | {"x": nested[0]})["id"] == "b"
