"""A real `batch-poller run` under a test-owned NOTIFY_SOCKET: readiness, watchdog, reload, stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time

import pytest
from aiohttp import web

from poller.sim import serve
from tests.helpers import (
    KEY_ENV,
    cli_env,
    config_dict,
    eventually,
    fast_sim,
    read_jsonl,
    start_daemon_process,
    stop_process,
    write_toml,
)


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(0.0)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode().strip()))
        return [m for _, m in self.messages]

    def has(self, field: str) -> bool:
        return any(field in m.splitlines() or m.startswith(field) for m in self.drain())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        ns = NotifySocket(path, path)
    else:
        name = f"batch-poller-test-{time.monotonic_ns()}"
        ns = NotifySocket("@" + name, "\0" + name)
    yield ns
    ns.close()


async def test_ready_watchdog_reload_stopping(tmp_path, notify_socket):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        ids = sim.create_batches(2)
        events = tmp_path / "events.jsonl"
        raw = config_dict(url, str(tmp_path / "state.db"), [{"kind": "file", "path": str(events)}])
        raw["source"]["track"] = ids[:1]
        config = write_toml(tmp_path / "config.toml", raw)
        env = cli_env({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"})
        proc = await start_daemon_process(config, tmp_path / "daemon.log", env=env)
        try:
            await eventually(lambda: notify_socket.has("READY=1"), timeout=15)
            await eventually(lambda: any(m.startswith("STATUS=tracking") for m in notify_socket.drain()))
            mark = len(notify_socket.drain())

            def pings() -> list[float]:
                notify_socket.drain()
                return [t for t, m in notify_socket.messages[mark:] if m == "WATCHDOG=1"]

            # Every 0.2 s, half of WATCHDOG_USEC: six pings span about a second, neither a flood nor late.
            await eventually(lambda: len(pings()) >= 6, timeout=10, interval=0.02)
            got = pings()[:6]
            gaps = (got[-1] - got[0]) / 5
            assert 0.1 <= gaps <= 0.4, got

            # A valid change: a second tracked id. RELOADING=1 then READY=1, and it is applied.
            raw["source"]["track"] = ids
            write_toml(config, raw)
            before = len(notify_socket.drain())
            proc.send_signal(signal.SIGHUP)
            await eventually(lambda: any("RELOADING=1" in m for m in notify_socket.drain()[before:]), timeout=10)
            assert any("MONOTONIC_USEC=" in m for m in notify_socket.drain()[before:] if "RELOADING=1" in m)
            await eventually(lambda: {e["data"]["id"] for e in read_jsonl(events)} == set(ids), timeout=10)
            assert any(m == "READY=1" for m in notify_socket.drain()[before:])

            # A broken config: keeps running on the old one and says why.
            (config).write_text("[poll]\nin_progress = 'whenever'\n")
            mark = len(notify_socket.drain())
            proc.send_signal(signal.SIGHUP)
            log = tmp_path / "daemon.log"
            await eventually(lambda: "config reload rejected" in log.read_text(), timeout=10)
            assert "poll.in_progress" in log.read_text()
            assert proc.returncode is None
            assert any(m == "READY=1" for m in notify_socket.drain()[mark:])
        finally:
            assert await stop_process(proc) == 0
        assert any("STOPPING=1" in m for m in notify_socket.drain())


async def test_sigterm_mid_delivery_exits_in_time_and_restart_delivers(tmp_path):
    hold = asyncio.Event()
    arrived: list[str] = []
    received: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        arrived.append(body["id"])
        if not hold.is_set():
            await asyncio.sleep(3600)  # accepts and never answers
        received.append(body["id"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sim = fast_sim(speed=0.001)
    try:
        async with serve(sim) as url:
            ids = sim.create_batches(3)
            sink = {"kind": "webhook", "url": f"http://127.0.0.1:{port}/hook", "timeout": "60s"}
            raw = config_dict(url, str(tmp_path / "state.db"), [sink])
            raw["source"]["track"] = ids
            raw["service"]["shutdown_timeout"] = "1s"
            config = write_toml(tmp_path / "config.toml", raw)
            proc = await start_daemon_process(config, tmp_path / "daemon.log")
            await eventually(lambda: len(arrived) == 3, timeout=20)  # the three deliveries hang in flight
            started = time.monotonic()
            assert await stop_process(proc, signal.SIGTERM) == 0
            assert time.monotonic() - started < 8  # the 1 s deadline, plus start-up and teardown
            assert received == []

            hold.set()
            proc = await start_daemon_process(config, tmp_path / "daemon.log")
            try:
                await eventually(lambda: len(received) == 3, timeout=20)
            finally:
                assert await stop_process(proc) == 0
    finally:
        await runner.cleanup()


async def test_sighup_adds_a_source_and_sigint_stops_cleanly(tmp_path):
    sims = {"alpha": fast_sim(speed=0.001, seed=81), "beta": fast_sim(speed=0.001, seed=82)}
    async with serve(sims["alpha"]) as alpha_url, serve(sims["beta"]) as beta_url:
        tracked = {name: sim.create_batches(1) for name, sim in sims.items()}
        events = tmp_path / "events.jsonl"
        raw = config_dict("http://placeholder", tmp_path / "state.db", [{"kind": "file", "path": str(events)}])
        del raw["source"]
        entries = {
            name: {"name": name, "provider": "openai", "base_url": url, "api_key_env": KEY_ENV, "track": tracked[name]}
            for name, url in (("alpha", alpha_url), ("beta", beta_url))
        }
        config = write_toml(tmp_path / "config.toml", raw | {"sources": [entries["alpha"]]})
        log = tmp_path / "daemon.log"
        proc = await start_daemon_process(config, log)
        try:
            await eventually(lambda: [e["data"]["source"] for e in read_jsonl(events)] == ["alpha"], timeout=15)
            assert sims["beta"].stats.total == 0

            write_toml(config, raw | {"sources": list(entries.values())})
            proc.send_signal(signal.SIGHUP)
            await eventually(lambda: "config reloaded" in log.read_text(), timeout=10)
            await eventually(lambda: {e["data"]["source"] for e in read_jsonl(events)} == {"alpha", "beta"})
            beta_events = [e for e in read_jsonl(events) if e["data"]["source"] == "beta"]
            assert [e["data"]["id"] for e in beta_events] == tracked["beta"]
            assert proc.returncode is None
        finally:
            assert await stop_process(proc, signal.SIGINT) == 0
        assert "Traceback" not in log.read_text()
