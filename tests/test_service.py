"""The HTTP service in front of a real in-process daemon (through `DaemonControl`, its real backend),
polling simulators over real HTTP, with file sinks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from poller.config import ServiceConfig, parse_config
from poller.errors import ConfigError
from poller.polling.runner import SourceRunner
from poller.runtime.control import DaemonControl
from poller.runtime.daemon import Daemon
from poller.service.app import Service
from poller.sim import ManualClock, OpenAISim, SimClock, SimProfile, serve
from tests.helpers import (
    KEY_ENV,
    cli_env,
    config_dict,
    eventually,
    fast_sim,
    make_config,
    read_jsonl,
    running,
    until,
    write_toml,
)

TOKEN_ENV = "BATCH_POLLER_TEST_SERVICE_TOKEN"
TOKEN = "svc-token-0123456789"
LOOPBACK = ServiceConfig(listen="127.0.0.1:0")


@dataclass
class Stack:
    sims: dict[str, OpenAISim]
    daemon: Daemon
    control: DaemonControl
    service: Service
    http: aiohttp.ClientSession
    events: Path

    @property
    def sim(self) -> OpenAISim:
        [sim] = self.sims.values()
        return sim

    @property
    def runner(self) -> SourceRunner:
        return self.daemon.runner(None)

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.get(path, **kwargs) as resp:
            return resp.status, await resp.json()

    async def post(self, body: Any, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.post("/v1/batches", json=body, **kwargs) as resp:
            return resp.status, await resp.json()

    async def until(self, path: str, status: int, timeout: float = 20.0) -> Any:
        """GET `path` until it answers `status`; returns that body."""
        deadline = time.monotonic() + timeout
        while True:
            got, body = await self.get(path)
            if got == status:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"GET {path}: still {got} {body} after {timeout}s")
            await asyncio.sleep(0.05)


@asynccontextmanager
async def stack(
    tmp_path: Path,
    sim: OpenAISim | dict[str, OpenAISim],
    *,
    track: list[str] | None = None,
    service: ServiceConfig = LOOPBACK,
    environ: dict[str, str] | None = None,
    extra_sinks: list[dict[str, Any]] | None = None,
    poll: dict[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    """Simulators, a daemon with a file sink, and a Service on a free loopback port; torn down in reverse.

    One simulator is the legacy single `[source]`; a dict of them is one `[[sources]]` entry per name.
    """
    sims = sim if isinstance(sim, dict) else {"openai": sim}
    events = tmp_path / "events.jsonl"
    async with AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(serve(s)) for name, s in sims.items()}
        sinks = [{"kind": "file", "name": "file", "path": str(events)}, *(extra_sinks or [])]
        raw = config_dict(next(iter(urls.values())), tmp_path / "state.db", sinks, **(poll or {}))
        if isinstance(sim, dict):
            del raw["source"]
            raw["sources"] = [
                {"name": name, "provider": "openai", "base_url": url, "api_key_env": KEY_ENV, "track": track or []}
                for name, url in urls.items()
            ]
        else:
            raw["source"]["track"] = track or []
        daemon = await stack.enter_async_context(running(make_config(raw)))
        control = DaemonControl(daemon)
        svc = await stack.enter_async_context(Service(control, service, environ=environ))
        http = await stack.enter_async_context(aiohttp.ClientSession(base_url=svc.url))
        yield Stack(sims, daemon, control, svc, http, events)


def scrape_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape(st: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with st.http.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return scrape_samples(await resp.text())


async def no_backlog(st: Stack) -> bool:
    return not await st.daemon.store.deliveries()


# -- probes ---------------------------------------------------------------------------------------


async def test_binds_a_free_port_and_healthz_is_ok(tmp_path):
    async with stack(tmp_path, fast_sim(speed=0.001)) as st:
        assert st.service.port > 0
        assert st.service.url == f"http://127.0.0.1:{st.service.port}"
        body = await st.until("/healthz", 200)
        assert body["status"] == "ok"
        assert body["loop_tick_age"] < 5


async def test_readyz_ok_after_a_successful_poll(tmp_path):
    sim = fast_sim(speed=0.001)
    ids = sim.create_batches(1)
    async with stack(tmp_path, sim, track=ids) as st:
        await eventually(lambda: st.runner.health.last_success is not None)
        status, body = await st.get("/readyz")
        assert (status, body["status"], body["reasons"]) == (200, "ok", [])


async def test_readyz_503_with_a_reason_when_the_key_is_rejected(tmp_path):
    sim = fast_sim(speed=0.001, api_keys=("other",))
    ids = sim.create_batches(1)
    async with stack(tmp_path, sim, track=ids) as st:
        body = await st.until("/readyz", 503)
        assert body["status"] == "fail"
        assert any("rejects the credentials" in r for r in body["reasons"]), body
        assert (await st.until("/healthz", 200))["status"] == "ok"  # alive, just not ready


# -- metrics --------------------------------------------------------------------------------------


async def test_metrics_counters_move_as_events_flow(tmp_path):
    sim = fast_sim(speed=0.001)  # frozen until the first scrape
    ids = sim.create_batches(3)
    async with stack(tmp_path, sim, track=ids) as st:
        await eventually(lambda: len(read_jsonl(st.events)) == 3)
        await until(lambda: no_backlog(st))
        first = await scrape(st)
        assert total(first, "batch_poller_events_total", type="batch.validating") == 3
        assert total(first, "batch_poller_deliveries_total", sink="file", result="delivered") == 3
        assert total(first, "batch_poller_api_requests_total") >= 1
        assert total(first, "batch_poller_api_requests_total", status="2xx") >= 1
        for gauge in ("outbox_pending", "outbox_dead", "outbox_oldest_pending_seconds"):
            assert (f"batch_poller_{gauge}", frozenset({("sink", "file")})) in first, gauge
        assert total(first, "batch_poller_outbox_pending", sink="file") == 0
        assert total(first, "batch_poller_sink_up", sink="file") == 1
        assert total(first, "batch_poller_tracked_batches", status="validating") == 3

        assert isinstance(sim.clock, SimClock)
        sim.clock.speed = 40  # let the batches run to the end
        await eventually(lambda: len(read_jsonl(st.events)) >= 9, timeout=60)
        await until(lambda: no_backlog(st))
        second = await scrape(st)
        delivered = len(read_jsonl(st.events))
        assert total(second, "batch_poller_events_total") >= delivered > 3
        assert total(second, "batch_poller_events_total", type="batch.in_progress") >= 1
        assert total(second, "batch_poller_deliveries_total", sink="file", result="delivered") == delivered
        assert total(second, "batch_poller_api_requests_total") > total(first, "batch_poller_api_requests_total")
        # The gauge follows the batches as they move, not only when something outside writes the state file.
        sim.clock.speed = 0.001  # freeze, and wait until memory has caught up with the frozen statuses
        tracker = st.runner.tracker

        def caught_up() -> bool:
            return all(b.knowledge.status == sim.get(b.id)["status"] for b in tracker.active())

        await eventually(caught_up)
        second = await scrape(st)
        moved = st.daemon.tracked_counts()["openai"]
        assert moved != {"validating": 3}
        assert total(second, "batch_poller_tracked_batches") == sum(moved.values())
        for status, count in moved.items():
            assert total(second, "batch_poller_tracked_batches", status=status) == count


async def test_metrics_show_a_failing_sinks_backlog(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    broken = {"kind": "file", "name": "broken", "path": str(blocker / "events.jsonl")}
    sim = fast_sim(speed=0.001)
    ids = sim.create_batches(2)
    async with stack(tmp_path, sim, track=ids, extra_sinks=[broken]) as st:
        await eventually(lambda: len(read_jsonl(st.events)) == 2)
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

        async def visibly_old() -> bool:  # the oldest pending row is at least a second old
            nonlocal samples
            samples = await scrape(st)
            return total(samples, "batch_poller_outbox_oldest_pending_seconds", sink="broken") >= 1

        await until(visibly_old)
        assert total(samples, "batch_poller_outbox_pending", sink="broken") == 2
        assert total(samples, "batch_poller_outbox_oldest_pending_seconds", sink="broken") >= 1
        assert total(samples, "batch_poller_sink_up", sink="broken") == 0
        assert total(samples, "batch_poller_sink_up", sink="file") == 1
        assert total(samples, "batch_poller_deliveries_total", sink="broken", result="retry") >= 1
        status, body = await st.get("/v1/status")
        assert status == 200
        assert body["sinks"]["broken"]["pending"] == 2
        assert body["sinks"]["broken"]["health"] != "ok"


async def test_stalled_batches_gauge_follows_a_stall_and_its_end(tmp_path):
    clock = ManualClock()  # the simulated batch does not move until the test moves this clock
    profile = SimProfile(validating_s=(1, 1), in_progress_s=(3600, 3600), p_failed=0, p_expired=0, requests=(100, 100))
    sim = OpenAISim(clock=clock, profile=profile, seed=3)
    [stuck] = sim.create_batches(1, created_at=clock.now() - 600)
    assert sim.get(stuck)["status"] == "in_progress"
    async with stack(tmp_path, sim, track=[stuck], poll={"stall_after": "1s", "progress": False}) as st:
        await eventually(lambda: any(e["type"] == "batch.stalled" for e in read_jsonl(st.events)))
        samples = await scrape(st)
        assert total(samples, "batch_poller_stalled_batches", source="openai") == 1
        assert total(samples, "batch_poller_tracked_batches", source="openai", status="in_progress") == 1

        clock.advance(600)  # its request counts move on

        async def cleared() -> bool:
            return total(await scrape(st), "batch_poller_stalled_batches", source="openai") == 0

        await until(cleared)
        assert sim.get(stuck)["status"] == "in_progress"


# -- control API ----------------------------------------------------------------------------------


async def test_post_tracks_a_batch_the_daemon_polls_get_lists_delete_untracks(tmp_path):
    sim = fast_sim(speed=0.001)
    first, second = sim.create_batches(2)
    async with stack(tmp_path, sim) as st:
        async with st.http.post("/v1/batches", json={"id": first}) as resp:
            assert resp.status == 201
            body = await resp.json()
        assert body["added"] == [first]
        assert body["already_tracked"] == []
        assert [v["id"] for v in body["data"]] == [first]

        await eventually(lambda: [e["data"]["id"] for e in read_jsonl(st.events)] == [first])
        assert read_jsonl(st.events)[0]["type"] == "batch.validating"

        async with st.http.post("/v1/batches", json={"id": first}) as resp:
            assert resp.status == 200
            assert (await resp.json())["already_tracked"] == [first]
        async with st.http.post("/v1/batches", json={"ids": [first, second, second]}) as resp:
            assert resp.status == 201
            body = await resp.json()
        assert (body["added"], body["already_tracked"]) == ([second], [first])

        await eventually(lambda: {e["data"]["id"] for e in read_jsonl(st.events)} == {first, second})
        status, listing = await st.get("/v1/batches")
        assert status == 200
        assert listing["object"] == "list"
        views = {v["id"]: v for v in listing["data"]}
        assert set(views) == {first, second}
        assert views[first]["status"] == "validating"
        assert views[first]["origin"] == "api"
        assert views[first]["batch"]["id"] == first

        status, view = await st.get(f"/v1/batches/{first}")
        assert (status, view["id"], view["state"]) == (200, first, "active")

        status, summary = await st.get("/v1/status")
        assert status == 200
        assert summary["tracked"] == {"validating": 2}
        assert summary["ready"] is True
        assert summary["reasons"] == []
        assert "tracking 2 batches" in summary["status_line"]
        assert set(summary["sinks"]) == {"file"}

        async with st.http.delete(f"/v1/batches/{first}") as resp:
            assert resp.status == 200
            assert await resp.json() == {"id": first, "object": "batch", "deleted": True}
        assert first not in st.runner.tracker.batches
        status, body = await st.get(f"/v1/batches/{first}")
        assert status == 404
        assert body["error"]["type"] == "not_found"
        async with st.http.delete(f"/v1/batches/{first}") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "not_found"
        status, listing = await st.get("/v1/batches")
        assert [v["id"] for v in listing["data"]] == [second]


BAD_BODIES: list[Any] = [
    b"not json",
    b"",
    [],
    {},
    {"id": 5},
    {"id": "bad id!"},
    {"id": "batch_ok\n"},
    {"id": "x" * 129},
    {"ids": []},
    {"ids": "batch_abc"},
    {"ids": ["batch_ok", None]},
    {"id": "batch_a", "ids": ["batch_b"]},
    {"batch_id": "batch_a"},
    {"ids": [f"batch_{i}" for i in range(1001)]},
    {"id": "batch_a", "source": 5},
    {"id": "batch_a", "source": "bad name!"},
    {"id": "batch_a", "source": "nope"},  # no such source
    {"source": "openai"},
]


async def test_bad_post_bodies_are_refused_with_400(tmp_path):
    async with stack(tmp_path, fast_sim(speed=0.001)) as st:
        for body in BAD_BODIES:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with st.http.post("/v1/batches", **kwargs) as resp:
                assert resp.status == 400, body
                error = (await resp.json())["error"]
                assert error["type"] == "invalid_request_error"
                assert error["message"]
        assert await st.daemon.store.batches() == []


async def test_unknown_routes_and_methods_answer_json_errors(tmp_path):
    async with stack(tmp_path, fast_sim(speed=0.001)) as st:
        status, body = await st.get("/v1/nothing-here")
        assert (status, body["error"]["type"]) == (404, "not_found")
        async with st.http.put("/v1/batches") as resp:
            assert resp.status == 405
            assert "POST" in resp.headers["Allow"]
            assert (await resp.json())["error"]["message"]


async def test_bad_source_query_is_refused_with_400(tmp_path):
    async with stack(tmp_path, fast_sim(speed=0.001)) as st:
        for query in ("?source=bad%20name!", "?source=nope"):
            status, body = await st.get("/v1/batches" + query)
            assert (status, body["error"]["type"]) == (400, "invalid_request_error"), query


# -- sources --------------------------------------------------------------------------------------


def two_sims() -> dict[str, OpenAISim]:
    return {"alpha": fast_sim(speed=0.001, seed=61), "beta": fast_sim(speed=0.001, seed=62)}


async def test_source_filters_get_and_post_tracks_into_the_named_source(tmp_path):
    sims = two_sims()
    a_ids = sims["alpha"].create_batches(2)
    [b_id] = sims["beta"].create_batches(1)
    async with stack(tmp_path, sims) as st:
        status, body = await st.post({"ids": a_ids, "source": "alpha"})
        assert (status, body["added"]) == (201, a_ids)
        assert {v["source"] for v in body["data"]} == {"alpha"}
        async with st.http.post("/v1/batches?source=beta", json={"id": b_id}) as resp:  # the query works too
            assert resp.status == 201
            assert [v["source"] for v in (await resp.json())["data"]] == ["beta"]

        # Each batch is polled from its own source's API.
        await eventually(lambda: len(read_jsonl(st.events)) == 3)
        got = {(e["data"]["source"], e["data"]["id"]) for e in read_jsonl(st.events)}
        assert got == {("alpha", a_ids[0]), ("alpha", a_ids[1]), ("beta", b_id)}
        assert set(st.daemon.runner("alpha").tracker.batches) == set(a_ids)
        assert set(st.daemon.runner("beta").tracker.batches) == {b_id}

        status, listing = await st.get("/v1/batches?source=alpha")
        assert status == 200
        assert sorted(v["id"] for v in listing["data"]) == sorted(a_ids)
        assert {v["source"] for v in listing["data"]} == {"alpha"}
        status, listing = await st.get("/v1/batches?source=beta")
        assert [(v["source"], v["id"]) for v in listing["data"]] == [("beta", b_id)]
        status, listing = await st.get("/v1/batches")
        assert sorted(v["id"] for v in listing["data"]) == sorted([*a_ids, b_id])

        assert (await st.get(f"/v1/batches/{a_ids[0]}?source=beta"))[0] == 404
        status, view = await st.get(f"/v1/batches/{a_ids[0]}?source=alpha")
        assert (status, view["source"], view["id"]) == (200, "alpha", a_ids[0])
        async with st.http.delete(f"/v1/batches/{a_ids[0]}?source=beta") as resp:
            assert resp.status == 404
        async with st.http.delete(f"/v1/batches/{a_ids[0]}?source=alpha") as resp:
            assert resp.status == 200
        status, listing = await st.get("/v1/batches?source=alpha")
        assert [v["id"] for v in listing["data"]] == [a_ids[1]]


async def test_an_unknown_or_missing_source_is_a_400_naming_the_choices(tmp_path):
    sims = two_sims()
    [a_id] = sims["alpha"].create_batches(1)
    async with stack(tmp_path, sims) as st:

        def names_choices(message: str) -> bool:
            return "alpha" in message and "beta" in message

        # Two sources and none named: a POST cannot guess where the batch lives.
        status, body = await st.post({"id": a_id})
        assert (status, body["error"]["type"]) == (400, "invalid_request_error")
        assert "more than one source" in body["error"]["message"]
        assert names_choices(body["error"]["message"]), body

        status, body = await st.post({"id": a_id, "source": "gamma"})
        assert status == 400
        assert "gamma" in body["error"]["message"]
        assert names_choices(body["error"]["message"]), body
        for path in ("/v1/batches?source=gamma", f"/v1/batches/{a_id}?source=gamma"):
            status, body = await st.get(path)
            assert status == 400, path
            assert "gamma" in body["error"]["message"]
            assert names_choices(body["error"]["message"]), body
        async with st.http.delete(f"/v1/batches/{a_id}?source=gamma") as resp:
            assert resp.status == 400
            assert names_choices((await resp.json())["error"]["message"])
        assert await st.daemon.store.batches() == []


# -- auth -----------------------------------------------------------------------------------------


async def test_token_guards_the_control_api_but_not_probes_or_metrics(tmp_path):
    config = ServiceConfig(listen="127.0.0.1:0", token_env=TOKEN_ENV)
    async with stack(tmp_path, fast_sim(speed=0.001), service=config, environ={TOKEN_ENV: TOKEN}) as st:
        refused = [
            {},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
            {"Authorization": "Bearer \u00e9"},
        ]
        for path in ("/v1/batches", "/v1/status", "/v1/batches/batch_x", "/v1/nothing-here"):
            for headers in refused:
                async with st.http.get(path, headers=headers) as resp:
                    assert resp.status == 401, (path, headers)
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                    assert (await resp.json())["error"]["type"] == "authentication_error"
        async with st.http.post("/v1/batches", json={"id": "batch_x"}) as resp:
            assert resp.status == 401
        assert await st.daemon.store.batches() == []

        good = {"Authorization": f"Bearer {TOKEN}"}
        assert (await st.get("/v1/batches", headers=good))[0] == 200
        assert (await st.get("/v1/status", headers=good))[0] == 200
        assert (await st.get("/v1/batches", headers={"Authorization": f"bearer {TOKEN}"}))[0] == 200
        async with st.http.post("/v1/batches", json={"id": "batch_x"}, headers=good) as resp:
            assert resp.status == 201

        async with st.http.get("/metrics") as resp:
            assert resp.status == 200
        await st.until("/healthz", 200)
        async with st.http.get("/readyz") as resp:
            assert resp.status in (200, 503)


async def test_token_from_a_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = ServiceConfig(listen="127.0.0.1:0", token_file=token_file)
    async with stack(tmp_path, fast_sim(speed=0.001), service=config) as st:
        assert (await st.get("/v1/status"))[0] == 401
        assert (await st.get("/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}))[0] == 200


async def test_a_configured_but_missing_token_fails_before_binding():
    with pytest.raises(ConfigError) as err:
        Service(None, ServiceConfig(listen="127.0.0.1:0", token_env=TOKEN_ENV), environ={})  # type: ignore[arg-type]
    assert err.value.key == "service.token_env"


async def test_a_taken_port_is_a_config_error_naming_listen(tmp_path):
    async with stack(tmp_path, fast_sim(speed=0.001)) as st:
        taken = ServiceConfig(listen=f"127.0.0.1:{st.service.port}")
        with pytest.raises(ConfigError) as err:
            async with Service(st.control, taken):
                pass
        assert err.value.key == "service.listen"


# -- config ---------------------------------------------------------------------------------------


def test_non_loopback_listen_without_a_token_is_refused_at_load():
    with pytest.raises(ValidationError, match="not a loopback address"):
        ServiceConfig(listen="0.0.0.0:9464")
    source = {"api_key_env": KEY_ENV}
    with pytest.raises(ConfigError) as err:
        parse_config({"source": source, "service": {"listen": "0.0.0.0:9464"}})
    assert err.value.key.startswith("service")
    assert "token" in err.value.problem
    assert parse_config({"source": source, "service": {"listen": "0.0.0.0:9464", "token_env": TOKEN_ENV}})
    assert parse_config({"source": source, "service": {"listen": "0.0.0.0:9464", "enabled": False}})
    assert parse_config({"source": source, "service": {"listen": "[::1]:9464"}}).service.is_loopback


def test_check_config_exits_78_for_a_public_listen_without_a_token(tmp_path):
    path = write_toml(
        tmp_path / "config.toml", {"source": {"api_key_env": KEY_ENV}, "service": {"listen": "0.0.0.0:9464"}}
    )
    result = subprocess.run(
        [sys.executable, "-m", "poller.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 78, result.stderr
    assert "service" in result.stderr
    assert "fix:" in result.stderr
