"""The `batch-poller` command line.

Exit codes: 0 ok, 1 failure, 2 usage, 3 `status` with no daemon answering, 78 bad configuration
(EX_CONFIG, which the systemd unit does not restart on), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from poller import __version__
from poller.cli.completion import SHELLS
from poller.cli.config_cmd import CHOICES as CONFIG_CHOICES
from poller.config import Config, find_config_path, load_config
from poller.config.sinks import SINK_KINDS
from poller.errors import ConfigError
from poller.logs import configure

EX_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    # Accepted before or after the command; after it, only when given (SUPPRESS keeps the first one).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sourced = argparse.ArgumentParser(add_help=False, parents=[common])
    sourced.add_argument("--source", help="the source (required when more than one is configured)")
    parser = argparse.ArgumentParser(
        prog="batch-poller", description="Watch Batch API batches; publish every transition."
    )
    parser.add_argument("--version", action="version", version=f"batch-poller {__version__}")
    parser.add_argument(
        "--config", type=Path, help="TOML config (default: $BATCH_POLLER_CONFIG, else /etc/batch-poller/config.toml)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon")
    p = sub.add_parser("track", parents=[sourced], help="start tracking batch ids (daemon running or not)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p = sub.add_parser("untrack", parents=[sourced], help="stop tracking batch ids")
    p.add_argument("ids", nargs="+", metavar="ID")
    p = sub.add_parser("list", parents=[sourced], help="tracked batches with status, progress, age, next poll")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = sub.add_parser("show", parents=[sourced], help="the events recorded for one batch")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="the full events, one per line")
    p = sub.add_parser("status", parents=[common], help="health, sources, sinks and backlog at a glance")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p = sub.add_parser("check-config", parents=[common], help="validate the config and its secrets, then exit")
    p.add_argument("--probe", action="store_true", help="also ask each source's API once whether URL and key work")
    p.add_argument("--json", action="store_true", help="the findings as one JSON object")
    p = sub.add_parser("cancel", parents=[sourced], help="cancel a batch through the API")
    p.add_argument("id", metavar="ID")
    p = sub.add_parser("deliveries", parents=[common], help="pending and dead-lettered deliveries per sink")
    p.add_argument("--sink", help="only this sink")
    p.add_argument("--dead", action="store_true", help="only dead-lettered deliveries")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = sub.add_parser("redeliver", parents=[common], help="re-queue dead-lettered (or one delivered) deliveries")
    p.add_argument("--sink", help="only this sink")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--event", help="one event id")
    which.add_argument("--all-dead", action="store_true", help="every dead-lettered delivery")
    p = sub.add_parser("config", help="print the example config, the systemd unit or the config's JSON Schema")
    p.add_argument("what", choices=CONFIG_CHOICES, help="example: config.example.toml; unit: the systemd unit")
    p = sub.add_parser("completion", help="print the shell completion script for bash or zsh")
    p.add_argument("shell", choices=SHELLS)
    p = sub.add_parser("demo", help="simulated Batch API + daemon, no key or broker needed (about a minute)")
    p.add_argument("--batches", type=int, default=10, help="how many batches (default 10)")
    p = sub.add_parser("simulate", help="run a simulated provider Batch API on a local port (for trials)")
    from poller.sim.__main__ import add_arguments  # noqa: PLC0415

    add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a reader that left shows here, inside the handler, not at interpreter exit
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `batch-poller list | head`: the reader left; say nothing more and exit as a pipe writer would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return code


def _dispatch(args: argparse.Namespace) -> int:  # noqa: PLR0911 - one return per command
    command: str = args.command
    if command == "demo":
        from poller.demo import run_demo  # noqa: PLC0415 - the simulator loads only for the demo

        configure("warning", "console")
        return asyncio.run(run_demo(args.batches))
    if command == "simulate":
        from poller.sim.__main__ import run  # noqa: PLC0415

        return run(args)
    if command == "config":
        from poller.cli.config_cmd import run as print_config  # noqa: PLC0415

        return print_config(args.what)
    if command == "completion":
        from poller.cli.completion import script  # noqa: PLC0415

        sys.stdout.write(script(_parser(), args.shell))
        return 0
    path = find_config_path(args.config)
    config = load_config(path, require_file=command == "run")
    if command == "run":
        from poller.cli.daemon import run as run_daemon  # noqa: PLC0415

        return run_daemon(config, path)
    if command == "check-config":
        return _check_config(config, probe=args.probe, as_json=args.json)
    if command == "cancel":
        from poller.cli.api import cancel  # noqa: PLC0415
        from poller.cli.state import pick_source  # noqa: PLC0415

        source = config.named_sources()[pick_source(config, args.source)]
        source.api_key()
        return asyncio.run(cancel(source, args.id))
    if command == "status":
        from poller.cli.daemon import status  # noqa: PLC0415

        return status(config, as_json=args.json)
    from poller.cli.state import run_store_command  # noqa: PLC0415

    return asyncio.run(run_store_command(args, config))


def _check_config(config: Config, *, probe: bool, as_json: bool) -> int:
    from poller.sinks.registry import build_sink  # noqa: PLC0415

    config.check_secrets()
    config.state.check()
    for name, sink_config in config.named_sinks().items():
        build_sink(name, sink_config, dict(os.environ))  # what start-up checks beyond the schema
    if as_json:
        return _check_config_json(config, probe=probe)
    sources = ", ".join(f"{n} ({s.provider_name} at {s.base_url})" for n, s in config.named_sources().items())
    sinks = ", ".join(f"{n} ({s.kind})" for n, s in config.named_sinks().items()) or "none"
    print(f"config OK: sources {sources}; sinks: {sinks}")
    print(f"state: {config.state.db_path()}")
    if not config.sinks:
        print(
            "warning: no [[sinks]] configured: events are recorded in the state file but published nowhere\n"
            f"  fix: add a [[sinks]] table (kind = {' | '.join(repr(k) for k in SINK_KINDS)})",
            file=sys.stderr,
        )
    if not probe:
        return 0
    from poller.cli.api import probe as probe_apis  # noqa: PLC0415

    return asyncio.run(probe_apis(config))


def _check_config_json(config: Config, *, probe: bool) -> int:
    """`check-config --json`: what the text report says, as one object (config errors still exit 78)."""
    import json  # noqa: PLC0415

    report: dict[str, object] = {
        "ok": True,
        "sources": {
            n: {"provider": s.provider_name, "base_url": s.base_url} for n, s in config.named_sources().items()
        },
        "sinks": {n: {"kind": s.kind} for n, s in config.named_sinks().items()},
        "state": str(config.state.db_path()),
        "warnings": [] if config.sinks else ["no [[sinks]] configured: events are recorded but published nowhere"],
    }
    if probe:
        from poller.cli.api import probe_sources  # noqa: PLC0415

        results = asyncio.run(probe_sources(config))
        report["probe"] = results
        report["ok"] = all(r["ok"] for r in results.values())
    print(json.dumps(report, separators=(",", ":")))
    return 0 if report["ok"] else 1
