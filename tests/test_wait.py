"""`batch-poller wait`, run as a real subprocess: its exit codes against a simulated Batch API it polls
itself, and the daemon's event stream it follows when a daemon answers (an in-test server speaking the
`GET /v1/events` contract: `id:`/`event:`/`data:` frames, `Last-Event-ID`, bearer auth)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from poller.cli.render import iso
from poller.cli.wait import EXIT_CANCELLED, EXIT_COMPLETED, EXIT_EXPIRED, EXIT_FAILED, EXIT_TIMEOUT, EXIT_UNKNOWN
from poller.sim import Fault, ManualClock, OpenAISim, SimProfile, serve
from tests.helpers import (
    KEY_ENV,
    cli_env,
    config_dict,
    eventually,
    fast_sim,
    make_config,
    on_a_terminal,
    running,
    write_toml,
)

FIXED = SimProfile(
    validating_s=(10, 10),
    in_progress_s=(100, 100),
    finalizing_s=(10, 10),
    cancelling_s=(10, 10),
    p_failed=0,
    p_expired=0,
    requests=(100, 100),
    request_failure_rate=(0, 0),
)
#: Past every phase, an expiry (24 h) included.
LATER = 100_000
TOKEN_ENV = "BATCH_POLLER_TEST_WAIT_TOKEN"
TOKEN = "wait-token-0123456789"


@dataclass
class Proc:
    """A running `batch-poller wait` and what it printed so far."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    async def line_with(self, *parts: str, timeout: float = 30) -> str:
        """The next stdout line containing every part (earlier lines are kept in `lines`)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"wait ended before printing {parts}: {self.lines}"
                line = raw.decode()
                self.lines.append(line)
                if all(p in line for p in parts):
                    return line

    async def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode, "".join(self.lines) + out.decode(), err.decode()


async def start_wait(config: Path, *args: str, env: dict[str, str] | None = None) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "poller.cli",
        "wait",
        *args,
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or cli_env(),
    )
    return Proc(proc)


@dataclass
class Simulated:
    sim: OpenAISim
    clock: ManualClock
    config: Path
    url: str


@asynccontextmanager
async def simulated(tmp_path: Path) -> AsyncIterator[Simulated]:
    """A simulated API on a clock the test moves, and a config pointing at it with no daemon."""
    clock = ManualClock()
    sim = OpenAISim(clock=clock, profile=FIXED, seed=3)
    async with serve(sim) as url:
        config = write_toml(tmp_path / "config.toml", config_dict(url, tmp_path / "s.db", []))
        yield Simulated(sim, clock, config, url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def retrieved(sim: OpenAISim, count: int = 1) -> None:
    """Until `wait` has asked the API about a batch `count` times (it has seen it as it is now)."""
    await eventually(lambda: sim.stats.retrieve >= count)


# -- polling the API itself: each exit code ----------------------------------------------------------------


async def test_waits_for_completion_showing_progress_and_exits_0(tmp_path: Path) -> None:
    async with simulated(tmp_path) as s:
        [batch_id] = s.sim.create_batches(1, outcome="completed")
        waiting = await start_wait(s.config, batch_id)
        await waiting.line_with(batch_id, "validating")
        s.clock.advance(60)  # half way through in_progress
        line = await waiting.line_with(batch_id, "in_progress")
        assert "50/100" in line
        s.clock.advance(LATER)
        await waiting.line_with(batch_id, "completed", "100/100")
        code, out, err = await waiting.finish()
    assert code == EXIT_COMPLETED, err
    assert out.rstrip().endswith("done: 1 completed")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("outcome", "code"),
    [("failed", EXIT_FAILED), ("expired", EXIT_EXPIRED), ("cancelled", EXIT_CANCELLED)],
)
async def test_each_unsuccessful_end_has_its_exit_code(tmp_path: Path, outcome: str, code: int) -> None:
    async with simulated(tmp_path) as s:
        [batch_id] = s.sim.create_batches(1, outcome="completed" if outcome == "cancelled" else outcome)
        waiting = await start_wait(s.config, batch_id)
        await retrieved(s.sim)
        if outcome == "cancelled":
            s.sim.start_cancel(batch_id)
        s.clock.advance(LATER)
        got, out, err = await waiting.finish()
    assert got == code, (out, err)
    assert f"done: 1 {outcome}" in out


async def test_the_worst_end_decides_when_batches_end_differently(tmp_path: Path) -> None:
    async with simulated(tmp_path) as s:
        ids = [s.sim.create_batches(1, outcome=o)[0] for o in ("completed", "expired", "failed")]
        s.sim.start_cancel(s.sim.create_batches(1)[0])
        s.clock.advance(LATER)
        code, out, err = await (await start_wait(s.config, *ids)).finish()
    assert code == EXIT_FAILED, (out, err)
    assert "done: 1 completed, 1 expired, 1 failed" in out


async def test_batches_already_final_exit_at_once(tmp_path: Path) -> None:
    async with simulated(tmp_path) as s:
        ids = s.sim.create_batches(2, outcome="completed")
        s.clock.advance(LATER)
        code, out, err = await (await start_wait(s.config, *ids)).finish()
        assert s.sim.stats.retrieve == 2  # one look each, no second round
    assert code == EXIT_COMPLETED, err
    assert out.rstrip().endswith("done: 2 completed")


async def test_timeout_exits_124(tmp_path: Path) -> None:
    async with simulated(tmp_path) as s:
        [batch_id] = s.sim.create_batches(1)  # the clock never moves: it stays validating
        code, out, err = await (await start_wait(s.config, batch_id, "--timeout", "1s")).finish()
    assert code == EXIT_TIMEOUT, err
    assert "timed out after 1s: 1 batch(es) not final" in out


async def test_an_id_the_api_does_not_know_exits_1_at_once(tmp_path: Path) -> None:
    async with simulated(tmp_path) as s:
        [batch_id] = s.sim.create_batches(1)
        code, out, err = await (await start_wait(s.config, batch_id, "batch_nope")).finish()
    assert code == EXIT_UNKNOWN, err
    assert "batch_nope  not found" in out


async def test_api_errors_are_said_once_and_retried(tmp_path: Path) -> None:
    async with simulated(tmp_path) as s:
        [batch_id] = s.sim.create_batches(1, outcome="completed")
        s.clock.advance(LATER)
        s.sim.inject(Fault(kind="500", count=2))
        code, out, err = await (await start_wait(s.config, batch_id)).finish()
    assert code == EXIT_COMPLETED, (out, err)
    assert err.count("retrying") == 1
    assert "Traceback" not in err


async def test_a_rejected_key_exits_1_without_showing_it(tmp_path: Path) -> None:
    secret = "sk-wrong-and-never-printed-0123456789"
    async with simulated(tmp_path) as s:
        [batch_id] = s.sim.create_batches(1)
        code, out, err = await (await start_wait(s.config, batch_id, env=cli_env({KEY_ENV: secret}))).finish()
    assert code == EXIT_UNKNOWN, (out, err)
    assert "rejects the key" in out
    assert secret not in out + err


async def test_json_prints_one_object_per_change(tmp_path: Path) -> None:
    async with simulated(tmp_path) as s:
        [batch_id] = s.sim.create_batches(1, outcome="completed")
        waiting = await start_wait(s.config, batch_id, "--json")
        await retrieved(s.sim)
        s.clock.advance(LATER)
        code, out, err = await waiting.finish()
    assert code == EXIT_COMPLETED, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["status"] for r in records] == ["validating", "completed"]
    assert records[-1] == {
        "id": batch_id,
        "source": "openai",
        "status": "completed",
        "request_counts": {"total": 100, "completed": 100, "failed": 0},
        "eta": None,
        "final": True,
        "problem": None,
    }


async def test_a_missing_api_key_exits_78(tmp_path: Path) -> None:
    async with simulated(tmp_path) as s:
        [batch_id] = s.sim.create_batches(1)
        env = {k: v for k, v in cli_env().items() if not k.startswith("BATCH_POLLER_TEST_KEY")}
        code, _, err = await (await start_wait(s.config, batch_id, env=env)).finish()
    assert code == 78, err
    assert "Traceback" not in err


def wait_on_a_terminal(config: Path, *args: str) -> tuple[int, str]:
    """`wait` with its stdout on a real pseudo-terminal: its exit code and what it drew there."""
    return on_a_terminal([sys.executable, "-m", "poller.cli", "wait", *args, "--config", str(config)])


async def test_on_a_terminal_lines_are_redrawn_and_outside_text_is_escaped(tmp_path: Path) -> None:
    hostile = "batch_\x1b[31mred\x07"
    async with simulated(tmp_path) as s:
        [batch_id] = s.sim.create_batches(1, outcome="completed")
        s.clock.advance(LATER)
        code, drawn = await asyncio.to_thread(wait_on_a_terminal, s.config, batch_id, hostile)
    assert code == EXIT_UNKNOWN
    assert "\x1b[2K" in drawn  # lines are redrawn in place
    assert "[############] 100%" in drawn
    [line] = [ln for ln in drawn.splitlines() if "not found" in ln][-1:]
    assert "batch_?[31mred? " in line
    assert "\x1b[31m" not in drawn
    assert "\x07" not in drawn


# -- following the daemon's stream -----------------------------------------------------------------------


@dataclass
class FakeDaemon:
    """The daemon's control API as `wait` uses it: `/v1/status`, batch views, and the event stream."""

    views: dict[str, dict[str, Any]]
    streams: list[dict[str, Any]] = field(default_factory=list)
    queue: asyncio.Queue[tuple[int, dict[str, Any]] | None] = field(default_factory=asyncio.Queue)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/v1/batches/{id}", self._view)
        app.router.add_get("/v1/events", self._events)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"message": "token"}}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def _view(self, request: web.Request) -> web.Response:
        view = self.views.get(request.match_info["id"])
        return web.json_response(view) if view else web.json_response({"error": {}}, status=404)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self.streams.append(
            {"batch": request.query.getall("batch", []), "last_event_id": request.headers.get("Last-Event-ID")}
        )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b": keep-alive\n\n")
        self.connected.set()
        while (item := await self.queue.get()) is not None:
            position, event = item
            frame = f"id: {position}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
            await resp.write(frame.encode())
        self.connected.clear()
        return resp  # the stream ends: the client must reconnect and resume

    async def push(self, position: int, event: dict[str, Any]) -> None:
        await self.connected.wait()
        await self.queue.put((position, event))

    async def drop(self) -> None:
        await self.queue.put(None)


def view(batch_id: str, status: str, done: int, sequence: int, state: str = "active") -> dict[str, Any]:
    return {
        "id": batch_id,
        "source": "openai",
        "state": state,
        "status": status,
        "sequence": sequence,
        "request_counts": {"total": 100, "completed": done, "failed": 0},
        "eta": None,
    }


def event(batch_id: str, status: str, done: int, sequence: int, eta: int | None = None) -> dict[str, Any]:
    kind = "batch.progress" if status == "in_progress" else f"batch.{status}"
    data = view(batch_id, status, done, sequence) | {"previous_status": "in_progress", "batch": {"id": batch_id}}
    del data["state"]
    if eta is not None:
        data["eta"] = eta
    else:
        del data["eta"]
    return {"id": f"evt_{sequence}", "object": "event", "type": kind, "created_at": 1_800_000_000, "data": data}


@asynccontextmanager
async def daemon(
    tmp_path: Path, views: dict[str, dict[str, Any]], api: str = "http://127.0.0.1:9/v1"
) -> AsyncIterator[tuple[FakeDaemon, Path]]:
    """A fake daemon on a free port and a config whose `[service]` points at it (and whose source at `api`,
    by default where nothing answers)."""
    fake = FakeDaemon(views)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    raw = config_dict(api, tmp_path / "s.db", [])
    raw["service"] = {"enabled": True, "listen": f"127.0.0.1:{port}", "token_env": TOKEN_ENV}
    try:
        yield fake, write_toml(tmp_path / "daemon.toml", raw)
    finally:
        await fake.drop()
        await runner.cleanup()


async def test_follows_the_daemons_stream_and_shows_its_eta(tmp_path: Path) -> None:
    env = cli_env({TOKEN_ENV: TOKEN})
    async with daemon(tmp_path, {"batch_a": view("batch_a", "in_progress", 10, 2)}) as (fake, config):
        waiting = await start_wait(config, "batch_a", env=env)
        await waiting.line_with("batch_a", "in_progress", "10/100")
        eta = 1_800_000_600
        await fake.push(3, event("batch_a", "in_progress", 50, 3, eta=eta))
        line = await waiting.line_with("batch_a", "50/100")
        assert f"eta {iso(eta)}" in line
        await fake.push(4, event("batch_a", "completed", 100, 5))
        code, out, err = await waiting.finish()
    assert code == EXIT_COMPLETED, (out, err)
    assert fake.streams[0] == {"batch": ["batch_a"], "last_event_id": None}


async def test_a_dropped_stream_is_resumed_from_the_last_event_id(tmp_path: Path) -> None:
    env = cli_env({TOKEN_ENV: TOKEN})
    views = {"batch_a": view("batch_a", "in_progress", 10, 2), "batch_b": view("batch_b", "completed", 100, 4)}
    async with daemon(tmp_path, views) as (fake, config):
        waiting = await start_wait(config, "batch_a", "batch_b", env=env)
        await fake.push(7, event("batch_a", "in_progress", 60, 3))
        await waiting.line_with("batch_a", "60/100")
        await fake.drop()
        await eventually(lambda: len(fake.streams) == 2)
        await fake.push(9, event("batch_a", "failed", 60, 4))
        code, out, err = await waiting.finish()
    assert code == EXIT_FAILED, (out, err)
    assert fake.streams[1] == {"batch": ["batch_a"], "last_event_id": "7"}  # batch_b was final from the start


async def test_a_batch_the_daemon_does_not_track_is_polled_from_the_api(tmp_path: Path) -> None:
    env = cli_env({TOKEN_ENV: TOKEN})
    async with simulated(tmp_path) as s:
        [polled] = s.sim.create_batches(1, outcome="completed")
        s.clock.advance(LATER)
        async with daemon(tmp_path, {"batch_a": view("batch_a", "in_progress", 10, 2)}, s.url) as (fake, config):
            waiting = await start_wait(config, "batch_a", polled, env=env)
            await waiting.line_with(polled, "completed")
            await fake.push(3, event("batch_a", "completed", 100, 3))
            code, out, err = await waiting.finish()
    assert code == EXIT_COMPLETED, (out, err)
    assert fake.streams[0]["batch"] == ["batch_a"]
    assert s.sim.stats.retrieve == 1


async def test_with_a_real_daemon_it_needs_no_api_key(tmp_path: Path) -> None:
    """Against the real daemon and its control API (no API key given to `wait`: it asks only the daemon)."""
    sim = fast_sim(speed=60)
    async with serve(sim) as url:
        [batch_id] = sim.create_batches(1, outcome="completed")
        raw = config_dict(url, tmp_path / "state.db", [])
        raw["source"]["track"] = [batch_id]
        raw["service"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}
        config = write_toml(tmp_path / "config.toml", raw)
        async with running(make_config(raw)):
            keyless = {k: v for k, v in cli_env().items() if k != KEY_ENV}
            code, out, err = await (await start_wait(config, batch_id, env=keyless)).finish(timeout=60)
    assert code == EXIT_COMPLETED, (out, err)
    assert f"{batch_id}  completed" in out


@pytest.mark.parametrize(("outcome", "code"), [("failed", EXIT_FAILED), ("cancelled", EXIT_CANCELLED)])
async def test_follows_the_real_daemons_stream_to_the_end(tmp_path: Path, outcome: str, code: int) -> None:
    """End to end: `wait` holds one `/v1/events` stream open on the running daemon and exits with the
    end the daemon detected (no API key of its own, so it cannot have polled the API instead)."""
    sim = fast_sim(speed=0.001)  # frozen until `wait` follows the stream
    async with serve(sim) as url:
        [batch_id] = sim.create_batches(1, outcome="failed" if outcome == "failed" else "completed")
        raw = config_dict(url, tmp_path / "state.db", [])
        raw["source"]["track"] = [batch_id]
        raw["service"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}
        config = write_toml(tmp_path / "config.toml", raw)
        async with running(make_config(raw)) as daemon:
            keyless = {k: v for k, v in cli_env().items() if k != KEY_ENV}
            waiting = await start_wait(config, batch_id, env=keyless)
            service = daemon.service
            assert service is not None
            await eventually(lambda: service.stream_clients == 1, timeout=30)
            if outcome == "cancelled":
                sim.cancel(batch_id)
            sim.clock.speed = 200
            code_, out, err = await waiting.finish(timeout=60)
    assert code_ == code, (out, err)
    assert f"{batch_id}  {outcome}" in out
