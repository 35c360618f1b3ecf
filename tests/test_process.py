"""Real `batch-poller` subprocesses: SIGKILL and restart, bad configs, the CLI beside a running daemon."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

import pytest
from aiohttp import web

from poller.sim import serve
from tests.helpers import (
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
        await asyncio.sleep(2)  # transitions keep happening while the daemon is dead

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
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        [batch_id] = sim.create_batches(1)
        events_file = tmp_path / "events.jsonl"
        raw = config_dict(url, str(tmp_path / "state.db"), [{"kind": "file", "path": str(events_file)}])
        config = write_toml(tmp_path / "config.toml", raw)
        proc = await start_daemon_process(config, tmp_path / "daemon.log")
        try:
            await asyncio.sleep(0.5)
            result = cli("track", batch_id, "--config", str(config))
            assert result.returncode == 0
            assert "tracking" in result.stdout
            await eventually(lambda: len(read_jsonl(events_file)) == 1, timeout=10)
            listing = cli("list", "--config", str(config)).stdout
            assert batch_id in listing
            assert "validating" in listing
            shown = cli("show", batch_id, "--config", str(config)).stdout
            assert "batch.validating" in shown
            assert cli("untrack", batch_id, "--config", str(config)).returncode == 0
            await asyncio.sleep(1.5)
            polled = sim.stats.retrieve
            await asyncio.sleep(1.5)
            assert sim.stats.retrieve == polled
        finally:
            assert await stop_process(proc) == 0


BAD_CONFIGS = [
    ("[poll]\nin_progress = '5x'\n", "poll.in_progress"),
    ("[poll]\nbogus = 1\n", "poll.bogus"),
    ("[source]\nbase_url = 'ftp://x'\n", "source.base_url"),
    ("[[sinks]]\nkind = 'carrier-pigeon'\n", "sinks[0]"),
    ("[[sinks]]\nkind = 'file'\n", "sinks[0].path"),
    ("[source]\napi_key_env = 'NOT_SET_ANYWHERE'\n", "source.api_key_env"),
    ("[source]\napi_key_file = '/nonexistent/key'\n", "source.api_key_file"),
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
        out = cli("status", "--config", str(config)).stdout
        assert "not answering" in out
        assert "2 validating" in out


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

                await eventually(lambda: "dead" in dead() and batch_id in dead(), timeout=15)
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
