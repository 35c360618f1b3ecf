"""The `batch-poller` command line. Exit codes: 0 ok, 1 failure, 2 usage, 78 bad configuration."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from poller import __version__
from poller.config import Config, find_config_path, load_config, read_secret
from poller.errors import ApiError, ConfigError
from poller.logs import configure
from poller.records import TrackedBatch
from poller.store import Store

EX_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, help="TOML config (default: $BATCH_POLLER_CONFIG, else /etc/batch-poller/config.toml)"
    )
    parser = argparse.ArgumentParser(
        prog="batch-poller", description="Watch Batch API batches; publish every transition."
    )
    parser.add_argument("--version", action="version", version=f"batch-poller {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon")
    p = sub.add_parser("track", parents=[common], help="start tracking batch ids (daemon running or not)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p = sub.add_parser("untrack", parents=[common], help="stop tracking batch ids")
    p.add_argument("ids", nargs="+", metavar="ID")
    p = sub.add_parser("list", parents=[common], help="tracked batches with status, progress, age, next poll")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = sub.add_parser("show", parents=[common], help="the events recorded for one batch")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="the full events, one per line")
    p = sub.add_parser("status", parents=[common], help="health, sinks, backlog and tracked batches at a glance")
    p.add_argument("--json", action="store_true", help="machine-readable")
    sub.add_parser("check-config", parents=[common], help="validate the config and its secrets, then exit")
    p = sub.add_parser("cancel", parents=[common], help="cancel a batch through the API")
    p.add_argument("id", metavar="ID")
    p = sub.add_parser("deliveries", parents=[common], help="pending and dead-lettered deliveries per sink")
    p.add_argument("--sink", help="only this sink")
    p.add_argument("--dead", action="store_true", help="only dead-lettered deliveries")
    p = sub.add_parser("redeliver", parents=[common], help="re-queue dead-lettered (or one delivered) deliveries")
    p.add_argument("--sink", help="only this sink")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--event", help="one event id")
    which.add_argument("--all-dead", action="store_true", help="every dead-lettered delivery")
    p = sub.add_parser("demo", help="simulated Batch API + daemon, no key or broker needed (about a minute)")
    p.add_argument("--batches", type=int, default=10, help="how many batches (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "demo":
        from poller.demo import run_demo  # noqa: PLC0415 - the simulator loads only for the demo

        configure("warning", "console")
        return asyncio.run(run_demo(args.batches))
    config = load_config(_config_path(args))
    if command == "run":
        return _run(config, _config_path(args))
    if command == "check-config":
        config.check_secrets()
        from poller.daemon import build_sink  # noqa: PLC0415

        for name, sink_config in config.named_sinks().items():
            build_sink(name, sink_config, dict(os.environ))  # what start-up checks beyond the schema
        sinks = ", ".join(f"{n} ({s.kind})" for n, s in config.named_sinks().items()) or "none"
        print(f"config OK: source {config.source.source_name} at {config.source.base_url}; sinks: {sinks}")
        print(f"state: {config.state.db_path()}")
        return 0
    if command == "cancel":
        return asyncio.run(_cancel(config, args.id))
    if command == "status":
        return _status(config, as_json=args.json)
    with Store(config.state.db_path()) as store:
        return _STORE_COMMANDS[command](args, config.source.source_name, store, time.time())


def _config_path(args: argparse.Namespace) -> Path | None:
    return find_config_path(args.config)


def _run(config: Config, path: Path | None) -> int:
    from poller.daemon import Daemon  # noqa: PLC0415 - keep store-only commands light

    config.check_secrets()
    configure(config.log.level, config.log.format)
    return asyncio.run(Daemon(config, config_path=path).run())


def _cmd_track(args: argparse.Namespace, source: str, store: Store, now: float) -> int:
    added = set(store.track(source, args.ids, "cli", now))
    for batch_id in args.ids:
        print(f"{batch_id}: {'tracking' if batch_id in added else 'already tracked'}")
    return 0


def _cmd_untrack(args: argparse.Namespace, source: str, store: Store, now: float) -> int:
    removed = set(store.untrack(source, args.ids, now))
    for batch_id in args.ids:
        print(f"{batch_id}: {'untracked' if batch_id in removed else 'was not tracked'}")
    return 0 if removed else 1


def _cmd_list(args: argparse.Namespace, source: str, store: Store, now: float) -> int:
    _print_list(store.batches(source), now, as_json=args.json)
    return 0


def _cmd_show(args: argparse.Namespace, source: str, store: Store, now: float) -> int:
    del now
    events = store.events_for(source, args.id)
    if not events and store.batch(source, args.id) is None:
        print(f"{args.id}: not tracked and no events recorded", file=sys.stderr)
        return 1
    if not events:
        print(f"{args.id}: tracked, no events recorded yet (not polled yet)", file=sys.stderr)
    for event in events:
        if args.json:
            print(json.dumps(event, separators=(",", ":")))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["created_at"]))
        print(f"{event['data']['sequence']:>4}  {when}  {event['type']:<22} {event['id']}")
    return 0


def _cmd_deliveries(args: argparse.Namespace, source: str, store: Store, now: float) -> int:
    del source, now
    rows = store.deliveries(args.sink, ("dead",) if args.dead else ("pending", "dead"))
    for d in rows:
        error = f"  {d.last_error}" if d.last_error else ""
        print(f"{d.sink:<12} {d.state:<8} {d.batch_id:<32} {d.type:<20} #{d.sequence:<3} tries={d.attempts}{error}")
    if not rows:
        print("no pending or dead deliveries")
    return 0


def _cmd_redeliver(args: argparse.Namespace, source: str, store: Store, now: float) -> int:
    del source
    count = store.redeliver(args.sink, args.event, now)
    print(f"re-queued {count} deliver{'y' if count == 1 else 'ies'}")
    return 0 if count else 1


_STORE_COMMANDS = {
    "track": _cmd_track,
    "untrack": _cmd_untrack,
    "list": _cmd_list,
    "show": _cmd_show,
    "deliveries": _cmd_deliveries,
    "redeliver": _cmd_redeliver,
}


def _ask_daemon(config: Config) -> dict[str, Any] | None:
    """The running daemon's `/v1/status`, or None when no daemon answers."""
    service = config.service
    if not service.enabled:
        return None
    host = "127.0.0.1" if service.host in {"0.0.0.0", "::", ""} else service.host  # noqa: S104 - wildcard binds
    url = f"http://{host if ':' not in host else f'[{host}]'}:{service.port}/v1/status"
    request = urllib.request.Request(url)
    if service.token_env or service.token_file:
        token = read_secret("service.token", service.token_env, service.token_file)
        request.add_header("Authorization", f"Bearer {token}")
    try:
        # the URL is built from our own config and is always http://
        with urllib.request.urlopen(request, timeout=2) as resp:  # noqa: S310
            body: dict[str, Any] = json.load(resp)
            return body
    except (OSError, ValueError):
        return None


def _status(config: Config, *, as_json: bool) -> int:
    report = _ask_daemon(config)
    if report is None:
        with Store(config.state.db_path()) as store:
            batches = store.batches(config.source.source_name)
            tracked: dict[str, int] = {}
            for b in batches:
                key = (b.knowledge.status or "not yet polled") if b.state == "active" else b.state
                tracked[key] = tracked.get(key, 0) + 1
            report = {"daemon": "not answering", "tracked": tracked, "sinks": store.outbox_stats()}
    else:
        report = {"daemon": "running"} | report
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"daemon:  {report['daemon']}" + (f" ({report['status_line']})" if report.get("status_line") else ""))
    if "ready" in report:
        reasons = "; ".join(report.get("reasons") or [])
        print(f"ready:   {'yes' if report['ready'] else 'NO: ' + reasons}")
    tracked = report.get("tracked") or {}
    print("tracked: " + (", ".join(f"{n} {s}" for s, n in sorted(tracked.items())) or "none"))
    for name, sink in (report.get("sinks") or {}).items():
        health = sink.get("health", "?")
        print(f"sink {name}: {health}, {sink.get('pending', 0)} pending, {sink.get('dead', 0)} dead")
    return 0


def _bar(done: int, total: int, width: int = 12) -> str:
    if total <= 0:
        return " " * (width + 2) + "    -"
    filled = round(width * done / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // total:>3}%"


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _print_list(batches: list[TrackedBatch], now: float, *, as_json: bool) -> None:
    if as_json:
        for b in batches:
            record = {
                "id": b.id,
                "source": b.source,
                "state": b.state,
                "status": b.knowledge.status,
                "request_counts": (b.snapshot or {}).get("request_counts"),
                "created_at": b.created_at,
                "next_due": b.next_due if b.state == "active" else None,
                "origin": b.origin,
            }
            print(json.dumps(record, separators=(",", ":")))
        return
    print(f"{'ID':<34} {'STATUS':<12} {'PROGRESS':<20} {'AGE':>5} {'NEXT POLL':>9}  TRACKED")
    for b in batches:
        counts = (b.snapshot or {}).get("request_counts") or {}
        status = b.knowledge.status or "(pending)"
        if b.state == "gone":
            status = "gone (404)"
        age = _ago(now - b.created_at) if b.created_at else "-"
        next_poll = "-" if b.state != "active" else ("now" if b.next_due <= now else "in " + _ago(b.next_due - now))
        progress = _bar(int(counts.get("completed", 0)) + int(counts.get("failed", 0)), int(counts.get("total", 0)))
        print(f"{b.id:<34} {status:<12} {progress:<20} {age:>5} {next_poll:>9}  {b.origin}")
    if not batches:
        print("(no batches tracked)")


async def _cancel(config: Config, batch_id: str) -> int:
    from poller.api import BatchApi  # noqa: PLC0415
    from poller.metrics import Metrics  # noqa: PLC0415
    from poller.schedule import Pacer  # noqa: PLC0415

    config.check_secrets()
    api = BatchApi(config.source, config.source.api_key(), metrics=Metrics(), pacer=Pacer(5.0))
    async with api:
        try:
            batch = await api.cancel(batch_id)
        except ApiError as exc:
            request = f" (request id {exc.request_id})" if exc.request_id else ""
            print(f"cancel failed: {exc}{request}", file=sys.stderr)
            return 1
    print(f"{batch.id}: {batch.status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
