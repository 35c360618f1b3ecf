"""CLI commands that read or change the state store directly: they work whether the daemon runs or not
(a running daemon notices the change within a second)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from poller.cli.render import print_deliveries, print_list
from poller.config import Config
from poller.errors import ConfigError
from poller.providers import canonical_id
from poller.store import open_store
from poller.store.base import Store


def pick_source(config: Config, name: str | None) -> str:
    """The source a command acts on: `--source`, or the only one configured."""
    names = list(config.named_sources())
    if name is None:
        if len(names) == 1:
            return names[0]
        raise ConfigError("--source", "more than one source is configured", f"name one of: {', '.join(names)}")
    if name not in names:
        raise ConfigError("--source", f"no source named {name!r}", f"name one of: {', '.join(names)}", name)
    return name


def _ids(config: Config, source: str, ids: list[str]) -> list[str]:
    provider = config.named_sources()[source].provider_name
    return list(dict.fromkeys(canonical_id(provider, i) for i in ids))


async def track(args: argparse.Namespace, config: Config, store: Store) -> int:
    source = pick_source(config, args.source)
    ids = _ids(config, source, args.ids)
    added = set(await store.track(source, ids, "cli", time.time()))
    for batch_id in ids:
        print(f"{batch_id}: {'tracking' if batch_id in added else 'already tracked'}")
    return 0


async def untrack(args: argparse.Namespace, config: Config, store: Store) -> int:
    source = pick_source(config, args.source)
    ids = _ids(config, source, args.ids)
    removed = set(await store.untrack(source, ids, time.time()))
    for batch_id in ids:
        print(f"{batch_id}: {'untracked' if batch_id in removed else 'was not tracked'}")
    return 0 if removed else 1


async def list_batches(args: argparse.Namespace, config: Config, store: Store) -> int:
    source = None if args.source is None else pick_source(config, args.source)
    known = set(config.named_sources())
    rows = [b for b in await store.batches(source) if b.source in known]
    print_list(rows, time.time(), sys.stdout, as_json=args.json, tty=sys.stdout.isatty())
    return 0


async def show(args: argparse.Namespace, config: Config, store: Store) -> int:
    source = None if args.source is None else pick_source(config, args.source)
    events = await store.events_for(source, args.id)
    tracked = any([await store.batch(s, args.id) for s in ([source] if source else config.named_sources())])
    if not events and not tracked:
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


async def deliveries(args: argparse.Namespace, config: Config, store: Store) -> int:
    _check_sink(config, args.sink)
    rows = await store.deliveries(args.sink, ("dead",) if args.dead else ("pending", "dead"))
    if args.json:
        for d in rows:
            record: dict[str, Any] = {
                "sink": d.sink,
                "state": d.state,
                "event_id": d.event_id,
                "batch_id": d.batch_id,
                "type": d.type,
                "sequence": d.sequence,
                "attempts": d.attempts,
                "last_error": d.last_error,
            }
            print(json.dumps(record, separators=(",", ":")))
        return 0
    print_deliveries(rows, sys.stdout)
    return 0


async def redeliver(args: argparse.Namespace, config: Config, store: Store) -> int:
    _check_sink(config, args.sink)
    count = await store.redeliver(args.sink, args.event, time.time())
    print(f"re-queued {count} deliver{'y' if count == 1 else 'ies'}")
    return 0 if count else 1


def _check_sink(config: Config, sink: str | None) -> None:
    names = list(config.named_sinks())
    if sink is not None and sink not in names:
        raise ConfigError("--sink", f"no sink named {sink!r}", f"name one of: {', '.join(names) or '(none)'}", sink)


Command = Callable[[argparse.Namespace, Config, Store], Awaitable[int]]
COMMANDS: dict[str, Command] = {
    "track": track,
    "untrack": untrack,
    "list": list_batches,
    "show": show,
    "deliveries": deliveries,
    "redeliver": redeliver,
}


async def run_store_command(args: argparse.Namespace, config: Config) -> int:
    async with open_store(config.state) as store:
        return await COMMANDS[args.command](args, config, store)
