"""Real `batch-poller` subprocesses: SIGKILL and restart, bad configs, the CLI beside a running daemon.

The CLI's own behaviour (exit codes, options, output formats) is in tests/test_cli.py.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from poller.sim import OpenAISim, SimClock, serve
from tests.helpers import (
    FAST_PROFILE,
    FINAL,
    KEY_ENV,
    check_event_log,
    cli_env,
    config_dict,
    eventually,
    fast_sim,
    read_jsonl,
    start_daemon_process,
    stop_process,
    write_toml,
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poller.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=60,
    )


class RecordingSim(OpenAISim):
    """An OpenAISim that remembers, in order, which batch each retrieve asked for."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retrieved: list[str] = []

    def app(self) -> web.Application:
        app = super().app()

        async def note(request: web.Request, _: web.StreamResponse) -> None:
            if request.method == "GET" and "batch_id" in request.match_info:
                self.retrieved.append(request.match_info["batch_id"])

        app.on_response_prepare.append(note)
        return app


def started(log: Path) -> bool:
    return log.exists() and "batch-poller started" in log.read_text()


def pending_rows(config) -> list[str]:
    out = cli("deliveries", "--config", str(config)).stdout
    return [line for line in out.splitlines() if line.split()[1:2] == ["pending"]]


async def test_sigkill_mid_run_loses_nothing_and_reemits_nothing(tmp_path):
    sim = fast_sim(speed=0.001, seed=11)  # frozen until every batch was seen validating
    async with serve(sim) as url:
        ids = sim.create_batches(12)
        events_file = tmp_path / "events.jsonl"
        raw = config_dict(url, str(tmp_path / "state.db"), [{"kind": "file", "path": str(events_file)}])
        raw["source"]["track"] = ids
        config = write_toml(tmp_path / "config.toml", raw)
        log = tmp_path / "daemon.log"

        proc = await start_daemon_process(config, log)
        await eventually(lambda: len(read_jsonl(events_file)) >= len(ids), timeout=30)
        sim.clock.speed = 15
        await eventually(lambda: len(read_jsonl(events_file)) >= len(ids) + 10, timeout=30)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        before = len(read_jsonl(events_file))

        def last_seen() -> dict[str, str]:
            return {e["data"]["id"]: e["data"]["status"] for e in read_jsonl(events_file)}

        # Transitions keep happening while the daemon is dead: wait for a few nobody has seen.
        await eventually(lambda: sum(sim.get(i)["status"] != last_seen().get(i) for i in ids) >= 3, timeout=30)

        proc = await start_daemon_process(config, log)
        try:
            await eventually(lambda: all(sim.get(i)["status"] in FINAL for i in ids), timeout=60)
            await eventually(
                lambda: {e["data"]["id"] for e in read_jsonl(events_file) if e["data"]["status"] in FINAL} >= set(ids),
                timeout=30,
            )
        finally:
            assert await stop_process(proc) == 0
        events = read_jsonl(events_file)
        assert len(events) > before
        # A line written but not yet acknowledged at the kill may repeat, under the same id; drop exact repeats.
        unique = list({e["id"]: e for e in events}.values())
        by_key = {}
        for event in unique:
            by_key.setdefault((event["data"]["id"], event["type"], event["data"]["sequence"]), event["id"])
        assert len(by_key) == len(unique), "an event was re-emitted under a new id"
        check_event_log(unique, sim, ids)


async def test_sigterm_exits_zero_and_keeps_undelivered_rows(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        ids = sim.create_batches(3)
        # A file sink whose directory cannot be created keeps failing: rows stay pending.
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        raw = config_dict(url, str(tmp_path / "state.db"), [{"kind": "file", "path": str(blocker / "x.jsonl")}])
        raw["source"]["track"] = ids
        config = write_toml(tmp_path / "config.toml", raw)
        proc = await start_daemon_process(config, tmp_path / "daemon.log")
        await eventually(lambda: len(pending_rows(config)) == 3, timeout=30)
        assert await stop_process(proc, signal.SIGTERM) == 0
        assert len(pending_rows(config)) == 3


async def test_track_and_untrack_reach_a_running_daemon(tmp_path):
    sim = RecordingSim(clock=SimClock(speed=0.001), profile=FAST_PROFILE, seed=7)
    async with serve(sim) as url:
        batch_id, keeper = sim.create_batches(2)
        events_file = tmp_path / "events.jsonl"
        raw = config_dict(url, str(tmp_path / "state.db"), [{"kind": "file", "path": str(events_file)}])
        raw["source"]["track"] = [keeper]  # keeps being polled: the clock that shows batch_id is not
        config = write_toml(tmp_path / "config.toml", raw)
        log = tmp_path / "daemon.log"
        proc = await start_daemon_process(config, log)
        try:
            await eventually(lambda: started(log), timeout=15)
            result = cli("track", batch_id, "--config", str(config))
            assert result.returncode == 0
            assert "tracking" in result.stdout
            await eventually(lambda: {e["data"]["id"] for e in read_jsonl(events_file)} == {batch_id, keeper})
            listing = cli("list", "--config", str(config)).stdout
            assert batch_id in listing
            assert "validating" in listing
            shown = cli("show", batch_id, "--config", str(config)).stdout
            assert "batch.validating" in shown
            assert cli("untrack", batch_id, "--config", str(config)).returncode == 0

            def keeper_polls_since_last_of_batch() -> int:
                tail = sim.retrieved[::-1]
                return tail.index(batch_id) if batch_id in tail else len(tail)

            # Both are polled at the same pace (max_interval 1 s), so four polls of keeper and none of
            # batch_id means the daemon dropped it; then keep watching for three more of keeper's.
            await eventually(lambda: keeper_polls_since_last_of_batch() >= 4, timeout=20)
            mark = len(sim.retrieved)
            await eventually(lambda: sim.retrieved[mark:].count(keeper) >= 3, timeout=20)
            assert batch_id not in sim.retrieved[mark:]
        finally:
            assert await stop_process(proc) == 0


BAD_CONFIGS = [
    ("[poll]\nin_progress = '5x'\n", "poll.in_progress"),
    ("[poll]\nbogus = 1\n", "poll.bogus"),
    ("[source]\nbase_url = 'ftp://x'\n", "source.base_url"),
    ("[[sinks]]\nkind = 'carrier-pigeon'\n", "sinks[0]"),
    ("[[sinks]]\nkind = 'file'\n", "sinks[0].path"),
    # A secret's key is named by its source ("openai" for the legacy [source] table).
    ("[source]\napi_key_env = 'NOT_SET_ANYWHERE'\n", "sources.openai.api_key_env"),
    ("[source]\napi_key_file = '/nonexistent/key'\n", "sources.openai.api_key_file"),
    ("[[sources]]\nname = 'a'\nprovider = 'openai'\napi_key_env = 'NOT_SET_ANYWHERE'\n", "sources.a.api_key_env"),
    ("[[sources]]\nprovider = 'carrier-pigeon'\n", "sources[0]"),
    ("[[sources]]\nname = 'a'\nprovider = 'openai'\n" * 2, "two sources are named 'a'"),
    ("this is not toml", "--config"),
]


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS)
@pytest.mark.parametrize("command", ["run", "check-config"])
def test_bad_config_exits_78_naming_the_key(tmp_path, text, key, command):
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = cli(command, "--config", str(path))
    assert result.returncode == 78, result.stderr
    assert key in result.stderr
    assert "fix:" in result.stderr
    assert not (tmp_path / "state.db").exists()


def test_secrets_never_appear_in_output(tmp_path):
    secret = "sk-this-must-never-be-printed-0123456789"
    path = tmp_path / "config.toml"
    path.write_text(f"[source]\napi_key_env = '{KEY_ENV}'\n[poll]\nin_progress = 'soon'\n")
    result = cli("run", "--config", str(path), env=cli_env({KEY_ENV: secret}))
    assert result.returncode == 78
    assert secret not in result.stdout + result.stderr
    # And a valid config against an API that rejects the key: the loud log line, never the key.
    path.write_text(f"[source]\napi_key_env = '{KEY_ENV}'\nbase_url = 'http://127.0.0.1:9/v1'\n")
    assert cli("check-config", "--config", str(path), env=cli_env({KEY_ENV: secret})).returncode == 0


async def test_rejected_key_logged_loudly_never_printed(tmp_path):
    secret = "sk-this-must-never-be-printed-0123456789"
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        ids = sim.create_batches(2)
        raw = config_dict(url, str(tmp_path / "state.db"), [])
        raw["source"]["track"] = ids
        config = write_toml(tmp_path / "config.toml", raw)
        log = tmp_path / "daemon.log"
        proc = await start_daemon_process(config, log, env=cli_env({KEY_ENV: secret}))
        try:
            await eventually(lambda: "REJECTS THE CREDENTIALS" in log.read_text(), timeout=15)
        finally:
            assert await stop_process(proc) == 0
        text = log.read_text()
        assert secret not in text
        assert text.count("REJECTS THE CREDENTIALS") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_status_asks_the_running_daemon_then_falls_back_to_the_store(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        ids = sim.create_batches(2)
        raw = config_dict(url, str(tmp_path / "state.db"), [{"kind": "file", "path": str(tmp_path / "e.jsonl")}])
        raw["source"]["track"] = ids
        raw["service"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}
        config = write_toml(tmp_path / "config.toml", raw)
        proc = await start_daemon_process(config, tmp_path / "daemon.log")
        try:
            await eventually(lambda: "running" in cli("status", "--config", str(config)).stdout, timeout=15)
            await eventually(lambda: "2 validating" in cli("status", "--config", str(config)).stdout, timeout=15)
            out = cli("status", "--config", str(config)).stdout
            assert "ready:   yes" in out
            assert "sink file: ok" in out
        finally:
            assert await stop_process(proc) == 0
        result = cli("status", "--config", str(config))
        assert result.returncode == 3  # no daemon answers
        assert "not answering" in result.stdout
        assert "2 validating" in result.stdout


async def test_cancel_goes_through_the_api(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        [batch_id] = sim.create_batches(1)
        config = write_toml(tmp_path / "config.toml", config_dict(url, str(tmp_path / "state.db"), []))
        result = await asyncio.to_thread(cli, "cancel", batch_id, "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{batch_id}: cancelling"
        assert sim.get(batch_id)["status"] == "cancelling"
        again = await asyncio.to_thread(cli, "cancel", "batch_nope", "--config", str(config))
        assert again.returncode == 1
        assert "cancel failed" in again.stderr


async def test_dead_letter_then_redeliver_from_the_cli(tmp_path):
    accept = asyncio.Event()
    received: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        if not accept.is_set():
            return web.json_response({"error": "schema mismatch"}, status=400)
        received.append(body["id"])
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    sim = fast_sim(speed=0.001)
    try:
        async with serve(sim) as url:
            [batch_id] = sim.create_batches(1)
            sink = {"kind": "webhook", "name": "hook", "url": f"http://127.0.0.1:{port}/hook"}
            raw = config_dict(url, str(tmp_path / "state.db"), [sink])
            raw["source"]["track"] = [batch_id]
            config = write_toml(tmp_path / "config.toml", raw)
            proc = await start_daemon_process(config, tmp_path / "daemon.log")
            try:

                def dead() -> str:
                    return cli("deliveries", "--dead", "--config", str(config)).stdout

                await eventually(lambda: "dead" in dead() and batch_id in dead(), timeout=45)
                assert "HTTP 400" in dead()
                accept.set()
                result = await asyncio.to_thread(cli, "redeliver", "--all-dead", "--config", str(config))
                assert result.stdout.strip() == "re-queued 1 delivery"
                await eventually(lambda: len(received) == 1, timeout=10)
                assert "no pending or dead deliveries" in cli("deliveries", "--config", str(config)).stdout
            finally:
                assert await stop_process(proc) == 0
    finally:
        await runner.cleanup()
