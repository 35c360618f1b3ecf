"""CLI commands that run the daemon or ask the running one: `run` and `status`."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

from poller.cli.render import print_status
from poller.config import Config, read_secret
from poller.logs import configure
from poller.store import open_store

#: `status` exit codes: running and ready, running but not ready, no daemon answering.
STATUS_READY, STATUS_NOT_READY, STATUS_NOT_RUNNING = 0, 1, 3


def run(config: Config, path: Path | None) -> int:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the config."""
    from poller.runtime.daemon import Daemon  # noqa: PLC0415 - keep the light commands light

    config.check_secrets()
    configure(config.log.level, config.log.format)
    daemon = Daemon(config, config_path=path, settle_heap=True)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, daemon.stop)
        loop.add_signal_handler(signal.SIGINT, daemon.stop)
        loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
        try:
            return await daemon.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    return asyncio.run(main())


def service_url(config: Config) -> str | None:
    """The base URL the running daemon's HTTP service answers on (from `[service]`), None when disabled."""
    service = config.service
    if not service.enabled:
        return None
    host = "127.0.0.1" if service.host in {"0.0.0.0", "::", ""} else service.host  # noqa: S104 - wildcard binds
    return f"http://{host if ':' not in host else f'[{host}]'}:{service.port}"


def service_headers(config: Config) -> dict[str, str]:
    """The control API's bearer token as a header, when one is configured."""
    service = config.service
    if not service.has_token:
        return {}
    token = read_secret("service.token", service.token_env, service.token_file)
    return {"Authorization": f"Bearer {token}"}


def ask_daemon(config: Config) -> dict[str, Any] | None:
    """The running daemon's `/v1/status`, or None when no daemon answers."""
    base = service_url(config)
    if base is None:
        return None
    # the URL is built from our own config and is always http://
    request = urllib.request.Request(f"{base}/v1/status", headers=service_headers(config))  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:  # noqa: S310
            body: dict[str, Any] = json.load(resp)
            return body
    except (OSError, ValueError):
        return None


async def _from_store(config: Config) -> dict[str, Any]:
    async with open_store(config.state) as store:
        tracked: dict[str, int] = {}
        for b in await store.batches():
            if b.source not in config.named_sources():
                continue
            key = (b.knowledge.status or "not yet polled") if b.state == "active" else b.state
            tracked[key] = tracked.get(key, 0) + 1
        return {"daemon": "not answering", "tracked": tracked, "sinks": await store.outbox_stats()}


def status(config: Config, *, as_json: bool) -> int:
    answer = ask_daemon(config)
    report = asyncio.run(_from_store(config)) if answer is None else {"daemon": "running"} | answer
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_status(report, sys.stdout)
    if answer is None:
        return STATUS_NOT_RUNNING
    return STATUS_READY if answer.get("ready") else STATUS_NOT_READY
