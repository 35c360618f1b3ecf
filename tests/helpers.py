"""Helpers for tests that run the daemon: a fast simulated API, config files, in-process and subprocess daemons."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from poller.config import Config, OpenAISourceConfig, parse_config
from poller.domain.events import Event, EventData, event_id
from poller.domain.schedule import Pacer
from poller.domain.snapshot import Snapshot
from poller.metrics import Metrics
from poller.providers.openai import OpenAIProvider
from poller.providers.openai_types import Batch
from poller.runtime.daemon import Daemon
from poller.sim import OpenAISim, SimClock, SimProfile

KEY_ENV = "BATCH_POLLER_TEST_KEY"
KEY = "sk-sim"
FINAL = {"completed", "failed", "expired", "cancelled"}

# Lifecycles of a few simulated minutes; at 30x they finish within seconds.
FAST_PROFILE = SimProfile(
    validating_s=(3, 20),
    in_progress_s=(20, 90),
    finalizing_s=(3, 20),
    cancelling_s=(3, 10),
    p_failed=0.1,
    p_expired=0.0,
)


def make_batch(status: str = "validating", batch_id: str = "batch_a", **fields: Any) -> Batch:
    """A Batch with every required field filled (created 1_700_000_000); `fields` add or override any field."""
    raw: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "created_at": 1_700_000_000,
        "status": status,
    }
    return Batch.model_validate(raw | fields)


_ADAPTER: OpenAIProvider | None = None


def openai_adapter() -> OpenAIProvider:
    """An OpenAI adapter that is never entered: for `normalize`, which sends nothing."""
    global _ADAPTER  # noqa: PLW0603 - one per test process
    if _ADAPTER is None:
        metrics = Metrics().source("openai")
        _ADAPTER = OpenAIProvider(
            OpenAISourceConfig(), "sk-test", metrics=metrics, pacer=Pacer(100.0), max_concurrency=1
        )
    return _ADAPTER


def make_snapshot(status: str = "validating", batch_id: str = "batch_a", **fields: Any) -> Snapshot:
    """The Snapshot the OpenAI adapter makes of `make_batch(status, batch_id, **fields)`."""
    return openai_adapter().normalize(make_batch(status, batch_id, **fields).wire())


def make_event(
    *,
    source: str,
    batch: Batch | dict[str, Any],
    event_type: str,
    status: str,
    previous_status: str | None,
    sequence: int,
    created_at: int,
    detected_at: float,
    discriminator: str = "",
    provider: str = "openai",
) -> Event:
    """An event as the recorder would publish it, from its parts (for sink tests)."""
    raw = batch.wire() if isinstance(batch, Batch) else dict(batch)
    counts = raw.get("request_counts")
    return Event(
        id=event_id(source, raw["id"], event_type, discriminator),
        type=event_type,
        created_at=created_at,
        data=EventData(
            id=raw["id"],
            status=status,
            previous_status=previous_status,
            sequence=sequence,
            detected_at=round(detected_at, 3),
            source=source,
            provider=provider,
            provider_status=raw.get("status"),
            request_counts=None if counts is None else {k: counts[k] for k in ("total", "completed", "failed")},
            batch=raw,
        ),
    )


def fast_sim(speed: float = 30.0, seed: int = 7, **kwargs: Any) -> OpenAISim:
    return OpenAISim(clock=SimClock(speed=speed), profile=FAST_PROFILE, seed=seed, **kwargs)


def config_dict(base_url: str, state: Path, sinks: list[dict[str, Any]], **poll: Any) -> dict[str, Any]:
    poll_section = {
        "latency": "0.2s",
        "validating": "0.2s",
        "in_progress": "0.2s",
        "finalizing": "0.2s",
        "cancelling": "0.2s",
        "max_interval": "1s",
        "error_backoff": "0.2s",
        "max_error_backoff": "1s",
        "progress_interval": "0.5s",
        "max_requests_per_second": 200,
        "discover_interval": "1s",
    } | poll
    return {
        "source": {"base_url": base_url, "api_key_env": KEY_ENV},
        "poll": poll_section,
        "state": {"path": str(state)},
        "service": {"enabled": False},
        "sinks": sinks,
    }


def make_config(raw: dict[str, Any]) -> Config:
    return parse_config(raw)


def write_toml(path: Path, raw: dict[str, Any]) -> Path:
    """A minimal TOML writer for the shapes tests use (tables, arrays of tables, scalars, lists, inline dicts)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    lines: list[str] = []
    for section, body in raw.items():
        if isinstance(body, list):  # [[sources]], [[sinks]]
            for entry in body:
                lines.append(f"[[{section}]]")
                lines.extend(f"{k} = {value(v)}" for k, v in entry.items())
        else:
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {value(v)}" for k, v in body.items())
    path.write_text("\n".join(lines) + "\n")
    return path


@asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[Daemon]:
    """A daemon running in this event loop; stopped (and awaited) on exit."""
    daemon = Daemon(config, environ={KEY_ENV: KEY} | kwargs.pop("environ", {}), **kwargs)
    task = asyncio.create_task(daemon.run())
    await asyncio.wait_for(daemon.ready.wait(), 10)
    try:
        yield daemon
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, 30) == 0


async def eventually(check: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> None:
    """Wait until `check()` is true; fail with the last state after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(interval)


async def until(check: Callable[[], Awaitable[object]], timeout: float = 30.0, interval: float = 0.05) -> None:
    """`eventually` for checks that must await (the store, a scrape): until `await check()` is truthy."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(interval)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def expected_statuses(batch: dict[str, Any]) -> list[str]:
    """The statuses a batch went through, from its own timestamps (what the file sink must show)."""
    path = ["validating"]
    for status in ("in_progress", "finalizing", "cancelling"):
        if batch.get(f"{status}_at") is not None:
            path.append(status)
    path.append(batch["status"])
    return path


def check_event_log(events: list[dict[str, Any]], sim: OpenAISim, ids: list[str]) -> None:
    """Every status of every batch exactly once (by id), per batch in sequence order, status events complete."""
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_batch.setdefault(event["data"]["id"], []).append(event)
    for batch_id in ids:
        got = by_batch.get(batch_id, [])
        seqs = [e["data"]["sequence"] for e in got]
        assert seqs == sorted(seqs), f"{batch_id}: out of order {seqs}"
        ids_seen = [e["id"] for e in got]
        assert len(ids_seen) == len(set(ids_seen)), f"{batch_id}: an event was delivered twice"
        statuses = [e["data"]["status"] for e in got if e["type"] == f"batch.{e['data']['status']}"]
        assert statuses == expected_statuses(sim.get(batch_id)), f"{batch_id}: {statuses}"


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_POLLER_")}
    env.update({KEY_ENV: KEY, "PYTHONUNBUFFERED": "1"})
    env.pop("NOTIFY_SOCKET", None)
    return env | (extra or {})


async def start_daemon_process(
    config_path: Path, log_path: Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    log = log_path.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "poller.cli",
            "run",
            "--config",
            str(config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env or cli_env(),
        )
    finally:
        log.close()


async def stop_process(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    if proc.returncode is None:
        proc.send_signal(sig)
    return await asyncio.wait_for(proc.wait(), timeout)


def status_event(batch_id: str, event_type: str, sequence: int, *, previous: str | None = None, **extra: Any) -> Event:
    """A status event of an `openai` batch as a sink receives it; `extra` overrides Batch fields."""
    status = event_type.removeprefix("batch.")
    fields: dict[str, Any] = {
        "created_at": 1714550000,
        "expires_at": 1714550000 + 86400,
        "metadata": {"team": "ml"},
        "request_counts": {"completed": 1, "failed": 0, "total": 2},
    } | extra
    return make_event(
        source="openai",
        batch=make_batch(batch_id=batch_id, **({"status": status} | fields)),
        event_type=event_type,
        status=status,
        previous_status=previous,
        sequence=sequence,
        created_at=1714550000 + sequence,
        detected_at=time.time(),
    )


def on_a_terminal(command: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `command` with its stdout on a real pseudo-terminal: its exit code and what it wrote there."""
    controller, terminal = os.openpty()
    try:
        done = subprocess.run(
            command,
            stdout=terminal,
            stderr=subprocess.DEVNULL,
            env=env or cli_env(),
            timeout=60,
            check=False,
        )
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
    return done.returncode, b"".join(chunks).decode()


@asynccontextmanager
async def posts_to(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """A real HTTP server on a free loopback port answering every POST with `handler`; yields host:port."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"{host}:{port}"
    finally:
        await runner.cleanup()
