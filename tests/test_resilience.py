"""What the daemon does when the API misleads it (issue 9), end to end over real HTTP and real SQLite.

- Discovery gap: a batch created and finished between two discovery passes still gets its events, a
  restart resumes from the stored horizon, and a fresh start does not report finished history.
- A wrong `base_url` (HTML 404s) never marks batches gone; a JSON 404 for one id while the API works does.
- One untrustworthy body (nesting too deep, a timestamp beyond 64 bits) is counted and logged once, and
  every other batch goes on to its final status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from poller.polling.discovery import CURSOR
from poller.runtime.control import DaemonControl
from poller.runtime.daemon import Daemon
from poller.sim import Fault, ManualClock, OpenAISim, SimClock, SimProfile, serve
from tests.helpers import (
    FINAL,
    check_event_log,
    config_dict,
    eventually,
    fast_sim,
    make_config,
    read_jsonl,
    running,
    until,
)

#: Batches that stay in_progress for an hour of simulated time, unless told to fail.
SLOW = SimProfile(validating_s=(5, 10), in_progress_s=(3600, 7200), finalizing_s=(5, 10), p_failed=0.0, p_expired=0.0)
#: Longer than any simulated batch validates: a batch created with outcome="failed" has failed by then.
PAST_VALIDATING = 30


def types_of(path: Path, batch_id: str) -> list[str]:
    """The types of the events the file sink wrote for one batch, in order."""
    return [e["type"] for e in read_jsonl(path) if e["data"]["id"] == batch_id]


async def states(daemon: Daemon) -> dict[str, str]:
    """Every stored batch of the only source, by id: its row state (active, final, gone)."""
    return {b.id: b.state for b in await daemon.store.batches(daemon.runner(None).name)}


async def settled(daemon: Daemon) -> bool:
    return not await daemon.store.batches(daemon.runner(None).name, states=["active"]) and not (
        await daemon.store.deliveries()
    )


def bad_responses(daemon: Daemon) -> dict[tuple[str, str], float]:
    """batch_poller_bad_responses_total by (source, reason)."""
    out: dict[tuple[str, str], float] = {}
    for family in daemon.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "batch_poller_bad_responses_total":
                out[(sample.labels["source"], sample.labels["reason"])] = sample.value
    return out


async def passes_later(daemon: Daemon, count: int) -> None:
    """Wait until `count` more discovery passes have run to their end."""
    discovery = daemon.runner(None).discovery
    start = discovery.next_at
    # Each pass sets next_at = its start + interval: once pass count+1 has begun, pass `count` has ended.
    await eventually(lambda: discovery.next_at >= start + (count + 1) * discovery.interval - 0.01, timeout=30)


def finish(sim: OpenAISim, clock: ManualClock) -> str:
    """A batch created now that fails while validating; returned once it has failed."""
    batch_id = sim.create_batch(outcome="failed")["id"]
    clock.advance(PAST_VALIDATING)
    assert sim.get(batch_id)["status"] == "failed"
    return batch_id


# -- a. discovery gaps ---------------------------------------------------------------------------


async def test_discovery_misses_nothing_between_passes_and_across_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    sim = OpenAISim(clock=clock, profile=SLOW, seed=21)
    events = tmp_path / "events.jsonl"
    raw = config_dict("http://placeholder", tmp_path / "state.db", [{"kind": "file", "path": str(events)}])
    async with serve(sim) as url:
        raw["source"] |= {"base_url": url, "discover": True}
        # Finished before the daemon ever ran, a few minutes before the newest batch: history, not news.
        history = finish(sim, clock)
        clock.advance(120)
        running_id = sim.create_batch()["id"]

        async with running(make_config(raw)) as daemon:
            runner = daemon.runner(None)
            await eventually(lambda: types_of(events, running_id) == ["batch.validating"])
            await until(lambda: daemon.store.cursor(runner.name, CURSOR))  # the first pass ended
            # Created and failed before the next pass: nothing ever saw it running.
            gap = finish(sim, clock)
            await eventually(lambda: types_of(events, gap) == ["batch.validating", "batch.failed"])
            assert (await states(daemon))[gap] == "final"

            assert await runner.untrack([running_id]) == [running_id]
            await passes_later(daemon, 2)
            assert running_id not in runner.tracker.batches, "an untracked batch was adopted again"
            assert history not in runner.tracker.batches, "a fresh start reported finished history"
            assert set(await states(daemon)) == {gap}

        # While the daemon is down, a batch comes and goes, and another starts.
        missed = finish(sim, clock)
        started = sim.create_batch()["id"]

        async with running(make_config(raw)) as daemon:
            runner = daemon.runner(None)
            await eventually(lambda: types_of(events, missed) == ["batch.validating", "batch.failed"])
            await eventually(lambda: types_of(events, started)[:1] == ["batch.validating"])
            await passes_later(daemon, 1)
            assert running_id not in runner.tracker.batches
            assert history not in runner.tracker.batches
            assert (await states(daemon)).keys() == {gap, missed, started}

    assert types_of(events, history) == []
    assert types_of(events, running_id)[:1] == ["batch.validating"]
    ids = [e["id"] for e in read_jsonl(events)]
    assert len(ids) == len(set(ids)), "an event was delivered twice"


async def test_a_fresh_start_adopts_only_running_batches(tmp_path: Path) -> None:
    clock = ManualClock()
    sim = OpenAISim(clock=clock, profile=SLOW, seed=22)
    async with serve(sim) as url:
        old = finish(sim, clock)
        recent = finish(sim, clock)
        live = sim.create_batch()["id"]
        raw = config_dict(url, tmp_path / "state.db", [])
        raw["source"]["discover"] = True
        async with running(make_config(raw)) as daemon:
            runner = daemon.runner(None)
            await eventually(lambda: live in runner.tracker.batches)
            await passes_later(daemon, 2)  # later passes keep to the first pass's choice
            assert set(runner.tracker.batches) == {live}
            assert set(await states(daemon)) == {live}
            assert old not in runner.tracker.batches
            assert recent not in runner.tracker.batches


# -- b. 404s: a wrong base_url, and one batch that is really gone ------------------------------


async def test_html_404s_mean_a_wrong_base_url_and_never_that_batches_are_gone(tmp_path: Path) -> None:
    sim = fast_sim(speed=0.001, seed=31)
    async with serve(sim) as url:
        ids = sim.create_batches(4)
        events = tmp_path / "events.jsonl"
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(events)}], gone_after=2)
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            runner, control = daemon.runner(None), DaemonControl(daemon)
            await eventually(lambda: len(read_jsonl(events)) == len(ids))
            with capture_logs() as logs:
                sim.inject(Fault(kind="html404", count=1_000_000))  # a proxy in front of the wrong path
                # Every batch polled more often than gone_after, every time answered by an HTML 404.
                await eventually(lambda: all(b.error_streak > 3 for b in runner.tracker.active()), timeout=30)
                ready, detail = control.readiness()
                status = await control.status()
            assert not ready
            assert any("base_url" in reason for reason in detail["reasons"]), detail
            assert status["sources"]["openai"]["misconfigured"] is not None
            assert "API MISCONFIGURED" in status["status_line"]
            assert await states(daemon) == dict.fromkeys(ids, "active")
            assert len(runner.tracker.active()) == len(ids)
            loud = [e for e in logs if e["event"] == "the Batch API looks misconfigured"]
            assert len(loud) == 1, loud
            assert not [e for e in logs if "gone" in e["event"]]

            sim.clear_faults()
            await eventually(lambda: control.readiness()[0], timeout=20)
            assert isinstance(sim.clock, SimClock)
            sim.clock.speed = 40
            await eventually(lambda: all(sim.get(i)["status"] in FINAL for i in ids), timeout=60)
            await until(lambda: settled(daemon), timeout=30)
        check_event_log(read_jsonl(events), sim, ids)


async def test_a_json_404_for_one_batch_marks_it_gone_and_track_revives_it(tmp_path: Path) -> None:
    sim = fast_sim(speed=0.001, seed=32)
    twin = fast_sim(speed=0.001, seed=32)  # the same seed draws the same ids: the next one sim will assign
    ids = sim.create_batches(2)
    ghost = twin.create_batches(3)[2]
    async with serve(sim) as url:
        events = tmp_path / "events.jsonl"
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(events)}], gone_after=2)
        raw["source"]["track"] = [*ids, ghost]
        async with running(make_config(raw)) as daemon:
            control = DaemonControl(daemon)

            async def ghost_gone() -> bool:
                return (await states(daemon)).get(ghost) == "gone"

            await until(ghost_gone, timeout=20)
            assert {i: s for i, s in (await states(daemon)).items() if i != ghost} == dict.fromkeys(ids, "active")
            assert control.readiness()[0], control.readiness()  # the API works: it is the batch that is gone
            assert types_of(events, ghost) == []

            assert sim.create_batch()["id"] == ghost  # it exists after all (a create the API was slow to show)
            added, views = await control.track([ghost], "api", None)
            assert added == [ghost]
            assert [v["state"] for v in views] == ["active"]
            await eventually(lambda: types_of(events, ghost) == ["batch.validating"])
            assert (await states(daemon))[ghost] == "active"


# -- c. one untrustworthy body -----------------------------------------------------------------


@asynccontextmanager
async def serve_without_list(sim: OpenAISim) -> AsyncIterator[str]:
    """`sim` behind a compatible server without a list endpoint: every poll is a retrieve per batch."""

    @web.middleware
    async def no_list(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/v1/batches":
            body = {"error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}}
            return web.json_response(body, status=404)
        return await handler(request)

    app = sim.app()
    app.middlewares.insert(0, no_list)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("fault", "reason"), [("deep_json", "batch_shape"), ("huge_int", "invalid_value")])
async def test_one_bad_body_is_counted_and_logged_once_and_stops_nothing_else(
    tmp_path: Path, fault: str, reason: str
) -> None:
    sim = fast_sim(speed=0.001, seed=41)
    async with serve_without_list(sim) as url:
        ids = sim.create_batches(5)
        bad, good = ids[0], ids[1:]
        events = tmp_path / "events.jsonl"
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(events)}])
        raw["source"]["track"] = ids
        sim.inject(Fault(kind=fault, count=1_000_000, route="retrieve", path_contains=bad))
        with capture_logs() as logs:
            async with running(make_config(raw)) as daemon:
                runner = daemon.runner(None)
                await eventually(lambda: {e["data"]["id"] for e in read_jsonl(events)} == set(good))
                await eventually(lambda: bad_responses(daemon).get(("openai", reason), 0) >= 3, timeout=20)
                assert isinstance(sim.clock, SimClock)
                sim.clock.speed = 40
                await eventually(lambda: all(sim.get(i)["status"] in FINAL for i in good), timeout=60)
                await eventually(lambda: [b.id for b in runner.tracker.active()] == [bad], timeout=30)
                assert types_of(events, bad) == []
                assert bad_responses(daemon)[("openai", reason)] >= 3
                assert runner.health.misconfigured is None, runner.health.misconfigured
                assert daemon.readiness()[0], daemon.readiness()
                assert daemon.liveness()[0]

                sim.clear_faults()  # the API answers properly again: the batch was kept all along
                await eventually(lambda: sim.get(bad)["status"] in FINAL, timeout=60)
                await until(lambda: settled(daemon), timeout=30)
        check_event_log(read_jsonl(events), sim, ids)
    about_bad = [e for e in logs if e.get("batch_id") == bad and e["log_level"] in {"warning", "error"}]
    assert len(about_bad) == 1, about_bad
    assert not [e for e in logs if e["log_level"] in {"error", "critical"}]
    assert not [e for e in logs if "misconfigured" in e["event"]]
