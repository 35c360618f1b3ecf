"""The daemon end to end, in process, against the simulator over real HTTP, with real SQLite and file sinks."""

from __future__ import annotations

import asyncio
import gc
import math
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from structlog.testing import capture_logs

from poller.runtime.daemon import Daemon
from poller.sim import Fault, OpenAISim, serve
from poller.store.base import TrackedBatch
from tests.helpers import (
    FINAL,
    KEY,
    KEY_ENV,
    check_event_log,
    config_dict,
    eventually,
    fast_sim,
    make_config,
    read_jsonl,
    running,
    until,
    write_toml,
)


async def rows(daemon: Daemon, state: str) -> list[TrackedBatch]:
    """The only source's stored batches in `state`."""
    return await daemon.store.batches(daemon.runner(None).name, states=[state])


async def settled(daemon: Daemon) -> bool:
    """No batch is active any more and every sink delivered everything."""
    return not await rows(daemon, "active") and not await daemon.store.deliveries()


async def test_twenty_batches_every_transition_once_in_order(tmp_path):
    sim = fast_sim(speed=0.001)  # frozen until every batch was seen validating
    async with serve(sim) as url:
        ids = sim.create_batches(20)
        events_file = tmp_path / "events.jsonl"
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(events_file)}])
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            await eventually(lambda: {e["data"]["id"] for e in read_jsonl(events_file)} == set(ids))
            sim.cancel(ids[0])
            sim.clock.speed = 40
            await eventually(lambda: all(sim.get(i)["status"] in FINAL for i in ids), timeout=60)
            await until(lambda: settled(daemon), timeout=40)
        check_event_log(read_jsonl(events_file), sim, ids)
        assert sim.get(ids[0])["status"] == "cancelled"


async def test_the_run_commands_daemon_freezes_its_heap_once_started_and_an_embedded_one_does_not(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        raw = config_dict(url, tmp_path / "state.db", [])
        raw["source"]["track"] = sim.create_batches(3)
        gc.unfreeze()
        try:
            async with running(make_config(raw)):
                assert gc.get_freeze_count() == 0
            async with running(make_config(raw), settle_heap=True) as daemon:
                # Frozen right after READY: the tracked batches are among the objects no collection walks.
                await eventually(lambda: gc.get_freeze_count() > 0)
                assert daemon.runner(None).tracker.batches
        finally:
            gc.unfreeze()  # the rest of the test session collects as before


async def test_bulk_refresh_uses_list_pages_instead_of_one_retrieve_each(tmp_path):
    sim = fast_sim(speed=0.001)  # frozen: every batch stays validating
    async with serve(sim) as url:
        ids = sim.create_batches(300, spread=60)
        sim.create_batches(50)  # newer untracked batches dilute the first page
        raw = config_dict(url, tmp_path / "state.db", [], validating="1h", max_interval="1h")
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            runner = daemon.runner(None)
            tracker = runner.tracker
            await eventually(lambda: all(b.created_at for b in tracker.batches.values()), timeout=30)
            sim.stats.reset()
            # Backdated batches may have finished already (the simulator's lifecycles start at created_at).
            active = tracker.active()
            for batch in active:
                batch.next_due = 0.0
            runner.wake()
            await eventually(lambda: all(b.next_due > 0 for b in active), timeout=30)
        requests = sim.stats.as_dict()
        floor = math.ceil(350 / 100)
        assert requests["retrieve"] == 0, requests
        assert requests["list"] <= floor, requests
        assert tracker.plan_walk(list(tracker.batches.values())) is not None


async def test_bad_responses_are_counted_and_never_become_events(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        ids = sim.create_batches(3)
        events_file = tmp_path / "events.jsonl"
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(events_file)}])
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            await eventually(lambda: len(read_jsonl(events_file)) == 3)
            for kind in ("nonjson", "unknown_status", "500"):
                sim.inject(Fault(kind=kind, count=3))
            await eventually(lambda: not sim.faults, timeout=20)
            polls_after = sim.stats.retrieve + sim.stats.list
            await eventually(lambda: sim.stats.retrieve + sim.stats.list > polls_after + 3)  # still polling
            bad = {s.labels["reason"]: s.value for s in _samples(daemon, "batch_poller_bad_responses_total")}
        events = read_jsonl(events_file)
        assert [e["type"] for e in events] == ["batch.validating"] * 3
        assert bad.get("not_json", 0) >= 3
        assert bad.get("unknown_status", 0) >= 3


async def test_unknown_batch_is_marked_gone_after_repeated_404(tmp_path):
    sim = fast_sim()
    async with serve(sim) as url:
        raw = config_dict(url, tmp_path / "state.db", [], gone_after=3)
        raw["source"]["track"] = ["batch_does_not_exist"]
        async with running(make_config(raw)) as daemon:
            await until(lambda: rows(daemon, "gone"), timeout=20)
            requests = sim.stats.retrieve
        assert requests == 3


async def test_discovery_tracks_running_batches_matching_the_filters(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        wanted = sim.create_batches(5, metadata={"team": "search"})
        sim.create_batches(5, metadata={"team": "ads"})
        raw = config_dict(url, tmp_path / "state.db", [])
        raw["source"] |= {"discover": True, "discover_metadata": {"team": "search"}}
        async with running(make_config(raw)) as daemon:
            tracker = daemon.runner(None).tracker
            await eventually(lambda: len(tracker.batches) == 5)
            assert set(tracker.batches) == set(wanted)


async def test_azure_classic_shape(tmp_path):
    sim = fast_sim(speed=0.001, prefixes=("/openai",))
    async with serve(sim) as url:
        ids = sim.create_batches(2)
        raw = config_dict(url, tmp_path / "state.db", [])
        raw["source"] |= {"kind": "azure", "api_version": "2024-10-21", "track": ids}
        async with running(make_config(raw)) as daemon:
            tracker = daemon.runner(None).tracker
            await eventually(lambda: all(b.knowledge.status == "validating" for b in tracker.batches.values()))


async def test_rejected_credentials_pause_polling_and_say_so_once(tmp_path):
    sim = fast_sim(speed=0.001, api_keys=("sk-other",))
    async with serve(sim) as url:
        ids = sim.create_batches(4)
        raw = config_dict(url, tmp_path / "state.db", [], auth_backoff="30s")
        raw["source"]["track"] = ids
        with capture_logs() as logs:
            async with running(make_config(raw)) as daemon:
                runner = daemon.runner(None)
                await eventually(lambda: runner.health.auth_failing)
                first = sim.stats.unauthorized
                since = runner.loop_tick
                await eventually(lambda: runner.loop_tick > since + 1.0)  # the loop went on for over a second
                assert sim.stats.unauthorized == first  # paused: no more requests for 30 s
    loud = [e for e in logs if "REJECTS THE CREDENTIALS" in e["event"]]
    assert len(loud) == 1
    assert all("sk-sim" not in str(e) for e in logs)


def _samples(daemon, name):
    for family in daemon.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                yield sample


@asynccontextmanager
async def three_pages_seen(tmp_path: Path) -> AsyncIterator[tuple[OpenAISim, Daemon]]:
    """A daemon tracking 300 frozen batches (three list pages), once it has seen every one of them."""
    sim = fast_sim(speed=0.001)  # frozen: every batch stays validating
    async with serve(sim) as url:
        ids = sim.create_batches(300, spread=60)
        raw = config_dict(url, tmp_path / "state.db", [], validating="1h", max_interval="1h")
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            tracker = daemon.runner(None).tracker
            await eventually(lambda: all(b.created_at for b in tracker.batches.values()), timeout=30)
            yield sim, daemon


def walk_now(daemon: Daemon) -> list[TrackedBatch]:
    """Make every active batch due and wake the runner: the next walk starts at once."""
    runner = daemon.runner(None)
    active = runner.tracker.active()
    for batch in active:
        batch.next_due = 0.0
    runner.wake()
    return active


async def test_first_refresh_of_many_new_ids_walks_the_list(tmp_path):
    async with three_pages_seen(tmp_path) as (sim, _daemon):
        pass
    requests = sim.stats.as_dict()
    assert requests["retrieve"] == 0, requests
    assert requests["list"] <= 4, requests


async def test_final_batches_are_pruned_after_retention_and_sinks_told_only_if_they_keep_state(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        [batch_id] = sim.create_batches(1, outcome="failed")
        events_file = tmp_path / "events.jsonl"
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(events_file)}], retention="2s")
        raw["source"]["track"] = [batch_id]
        async with running(make_config(raw)) as daemon:
            await eventually(lambda: len(read_jsonl(events_file)) == 1)  # first seen: validating
            sim.clock.speed = 1000
            source = daemon.runner(None).name
            await until(lambda: rows(daemon, "final"), timeout=10)

            async def forgotten() -> bool:
                return await daemon.store.batch(source, batch_id) is None

            await until(forgotten, timeout=10)
            # Its delivered events age out with it; the file sink never saw the internal prune notice.
            assert await daemon.store.events_for(source, batch_id) == []
        assert [e["type"] for e in read_jsonl(events_file)] == ["batch.validating", "batch.failed"]


async def test_a_long_retry_after_pauses_polling_but_not_the_loop(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        ids = sim.create_batches(3)
        raw = config_dict(url, tmp_path / "state.db", [])
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            runner = daemon.runner(None)
            await eventually(lambda: all(b.knowledge.status for b in runner.tracker.batches.values()))
            sim.inject(Fault(kind="429", count=1, retry_after=3))
            await eventually(lambda: not sim.faults)
            await eventually(lambda: runner.pacer.paused_until > time.monotonic())
            paused_at = sim.stats.total

            def two_seconds_in_and_alive() -> bool:
                assert daemon.liveness()[0], daemon.liveness()
                return time.monotonic() >= runner.pacer.paused_until - 1.0

            await eventually(two_seconds_in_and_alive, timeout=5)  # 2 s into a 3 s pause
            assert sim.stats.total == paused_at  # honoured: nothing sent during the pause
            await eventually(lambda: sim.stats.total > paused_at, timeout=5)


async def test_an_api_without_a_list_endpoint_falls_back_to_retrieves(tmp_path):
    sim = fast_sim(speed=0.001)
    ids = sim.create_batches(30)
    retrieves = [0]

    async def retrieve(request: web.Request) -> web.Response:
        retrieves[0] += 1
        return web.json_response(sim.get(request.match_info["id"]))

    async def no_list(_request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "not found", "type": "invalid_request_error"}}, status=404)

    app = web.Application()
    app.router.add_get("/v1/batches/{id}", retrieve)
    app.router.add_get("/v1/batches", no_list)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        raw = config_dict(url, tmp_path / "state.db", [], validating="0.5s", max_interval="0.5s")
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            source = daemon.runner(None)
            await eventually(lambda: all(b.knowledge.status for b in source.tracker.batches.values()))
            # Several refreshes, each of which would have tried a walk.
            await eventually(lambda: retrieves[0] >= 4 * len(ids), timeout=20)
            assert source.health.list_unavailable
            assert await rows(daemon, "gone") == []
            assert len(source.tracker.active()) == 30
    finally:
        await runner.cleanup()


async def test_reload_that_cannot_build_a_sink_changes_nothing(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        [batch_id] = sim.create_batches(1)
        first = tmp_path / "first.jsonl"
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "name": "first", "path": str(first)}])
        raw["source"]["track"] = [batch_id]
        path = write_toml(tmp_path / "config.toml", raw)
        environ = {"BAD_SECRET": "whsec_!!!not-base64!!!"}
        async with running(make_config(raw), config_path=path, environ=environ) as daemon:
            await eventually(lambda: len(read_jsonl(first)) == 1)
            bad = raw | {"sinks": [{"kind": "webhook", "url": "http://127.0.0.1:9/x", "secret_env": "BAD_SECRET"}]}
            write_toml(path, bad)
            with capture_logs() as logs:
                daemon.request_reload()
                await eventually(lambda: any("reload rejected" in e["event"] for e in logs))
            assert list(daemon.sinks.workers) == ["first"]
            assert "whsec_!!!" not in str(logs)

            second = tmp_path / "second.jsonl"
            good = raw | {"sinks": [{"kind": "file", "name": "second", "path": str(second)}]}
            write_toml(path, good)
            daemon.request_reload()
            await eventually(lambda: list(daemon.sinks.workers) == ["second"])
            sim.cancel(batch_id)
            await eventually(lambda: [e["type"] for e in read_jsonl(second)] == ["batch.cancelling"])
        assert [e["type"] for e in read_jsonl(first)] == ["batch.validating"]


async def test_first_sight_walk_goes_on_while_pages_pay_for_themselves(tmp_path):
    """200 tracked batches spread among the newest 2,000: walking 20 pages beats 200 retrieves."""
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        every = sim.create_batches(2000, spread=3600)
        ids = every[::10]
        raw = config_dict(url, tmp_path / "state.db", [], validating="1h", max_interval="1h")
        raw["source"]["track"] = ids
        async with running(make_config(raw)) as daemon:
            tracker = daemon.runner(None).tracker
            await eventually(lambda: all(b.created_at for b in tracker.batches.values()), timeout=30)
        requests = sim.stats.as_dict()
        assert requests["list"] <= 21, requests
        assert requests["retrieve"] <= 5, requests


async def test_a_walk_reads_the_next_page_ahead_and_a_failure_there_only_delays_its_batches(tmp_path):
    """The next list page is requested while the current one is applied: when that request fails, the
    page's batches back off as before and are refreshed later; nothing is left running."""
    with capture_logs() as logs:
        async with three_pages_seen(tmp_path) as (sim, daemon):
            sim.inject(Fault(kind="500", count=1, route="list", path_contains="after="))
            active = walk_now(daemon)
            await eventually(lambda: not sim.faults, timeout=30)  # the page read ahead failed
            await eventually(lambda: all(b.next_due > 0 and not b.error_streak for b in active), timeout=30)
    assert not [e for e in logs if e["log_level"] in {"error", "critical"}], logs


async def test_stopping_during_a_walk_cancels_the_page_read_ahead(tmp_path):
    async with three_pages_seen(tmp_path) as (sim, daemon):
        slow = sim.inject(Fault(kind="slow", delay=30.0, count=5, route="list", path_contains="after="))
        walk_now(daemon)
        await eventually(lambda: slow.count < 5, timeout=30)  # a page is on its way, slowly
    # the daemon stopped without waiting for it, and left no request behind
    pending = [t for t in asyncio.all_tasks() if "list_page" in repr(t.get_coro())]
    assert pending == []


async def test_a_crashed_delivery_worker_stops_the_daemon_with_exit_1(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        [batch_id] = sim.create_batches(1)
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(tmp_path / "e.jsonl")}])
        raw["source"]["track"] = [batch_id]
        daemon = Daemon(make_config(raw), environ={KEY_ENV: KEY})
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)

        async def broken(*_args, **_kwargs):
            raise sqlite3.OperationalError("database is locked")

        worker = daemon.sinks.workers["file"]
        worker.store = type("Broken", (), {"claim_heads": broken, "next_ready_at": broken})()
        worker.wake()
        assert await asyncio.wait_for(task, 30) == 1
