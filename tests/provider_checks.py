"""What the Mistral, Together and OpenRouter provider tests share: an adapter on a simulator, and one
daemon run that discovers a simulator's batches and follows them to their final statuses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from poller.config.sources import SourceConfig
from poller.domain.schedule import Pacer
from poller.metrics import Metrics
from poller.providers import make_provider
from poller.providers.base import Provider
from poller.runtime.daemon import Daemon
from poller.sim import SimApi, SimClock, serve
from tests.helpers import (
    FAST_PROFILE,
    FINAL,
    KEY,
    KEY_ENV,
    config_dict,
    eventually,
    make_config,
    read_jsonl,
    running,
    until,
)


def frozen(sim_class: type[SimApi], **kwargs: Any) -> Any:
    """A simulator on a clock that barely moves (until its speed is raised), with short lifecycles."""
    return sim_class(clock=SimClock(speed=0.001), profile=FAST_PROFILE, seed=7, **kwargs)


@asynccontextmanager
async def adapter_for(provider: str, url: str, rate: float = 1000.0) -> AsyncIterator[Provider]:
    """The `provider`'s adapter (entered) on `url`, made as the daemon makes it."""
    config = source_config(provider, url)
    provider = make_provider(config, KEY, metrics=Metrics().source("test"), pacer=Pacer(rate), max_concurrency=4)
    async with provider:
        yield provider


def source_config(provider: str, url: str, **keys: Any) -> SourceConfig:
    """A `[[sources]]` entry of `provider` on `url`, its key from KEY_ENV."""
    entry = {"provider": provider, "base_url": url, "api_key_env": KEY_ENV} | keys
    return TypeAdapter(SourceConfig).validate_python(entry)


async def settled(daemon: Daemon) -> bool:
    """No batch is active any more and every sink delivered everything."""
    name = daemon.runner(None).name
    return not await daemon.store.batches(name, states=["active"]) and not await daemon.store.deliveries()


def by_batch(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        out.setdefault(event["data"]["id"], []).append(event)
    return out


async def follow_to_the_end(
    tmp_path: Path, sim: Any, provider: str, *, cancel_shows: str | None, count: int = 12, later: int = 3
) -> tuple[list[dict[str, Any]], list[str], str]:
    """A daemon with one `provider` source (discover = true) on `sim`; returns (events, batch ids, cancelled id).

    While the simulator's clock is frozen, `count` batches are discovered, the first is cancelled (its
    `cancel_shows` event, when the API shows the cancel at all, is awaited) and `later` more are
    created and discovered by a later pass. Then the clock runs until every batch is final and every
    event was delivered to the file sink.
    """
    async with serve(sim) as url:
        ids = sim.create_batches(count)
        events_file = tmp_path / "events.jsonl"
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(events_file)}])
        del raw["source"]
        raw["sources"] = [
            {"provider": provider, "name": provider, "base_url": url, "api_key_env": KEY_ENV, "discover": True}
        ]

        def seen(wanted: list[str], event_type: str = "batch.validating") -> bool:
            got = {e["data"]["id"] for e in read_jsonl(events_file) if e["type"] == event_type}
            return set(wanted) <= got

        async with running(make_config(raw)) as daemon:
            await eventually(lambda: seen(ids))
            cancelled = ids[0]
            sim.cancel(cancelled)
            if cancel_shows is not None:
                await eventually(lambda: seen([cancelled], cancel_shows))
            ids += sim.create_batches(later)
            await eventually(lambda: seen(ids))  # a later discovery pass found them
            sim.clock.speed = 40
            await eventually(lambda: all(sim.common_status(i) in FINAL for i in ids), timeout=60)
            await until(lambda: settled(daemon), timeout=40)
        return read_jsonl(events_file), ids, cancelled


def check_events(
    events: list[dict[str, Any]], sim: Any, ids: list[str], provider: str, status_map: dict[str, str]
) -> dict[str, list[str]]:
    """Checks every provider's events must pass; returns each batch's status path.

    Per batch: sequences increase, no event twice, the path starts validating and ends in the batch's
    final status, every event names the provider, its own status (mapped by `status_map`) and its
    object unchanged (`data.batch["status"]` is `data.provider_status`).
    """
    paths: dict[str, list[str]] = {}
    grouped = by_batch(events)
    assert set(grouped) == set(ids)
    for batch_id in ids:
        got = grouped[batch_id]
        seqs = [e["data"]["sequence"] for e in got]
        assert seqs == sorted(seqs), f"{batch_id}: out of order {seqs}"
        assert len({e["id"] for e in got}) == len(got), f"{batch_id}: an event was delivered twice"
        for event in got:
            data = event["data"]
            assert data["provider"] == provider
            assert data["source"] == provider
            assert data["batch"]["id"] == batch_id
            assert data["batch"]["status"] == data["provider_status"]
            assert data["provider_status"] in status_map, data["provider_status"]
        path = [e["data"]["status"] for e in got if e["type"] == f"batch.{e['data']['status']}"]
        assert path[0] == "validating", f"{batch_id}: {path}"
        final = sim.common_status(batch_id)
        assert path[-1] == final, f"{batch_id}: {path}, is {final}"
        assert status_map[got[-1]["data"]["provider_status"]] == final
        paths[batch_id] = path
    return paths


async def bulk_refresh(tmp_path: Path, sim: Any, provider: str, ids: list[str]) -> dict[str, int]:
    """The requests one refresh of every tracked batch (`ids`, all due at once) sends to `sim`."""
    async with serve(sim) as url:
        raw = config_dict(url, tmp_path / "state.db", [], validating="1h", max_interval="1h")
        del raw["source"]
        raw["sources"] = [{"provider": provider, "base_url": url, "api_key_env": KEY_ENV, "track": ids}]
        async with running(make_config(raw)) as daemon:
            runner = daemon.runner(None)
            tracker = runner.tracker
            await eventually(
                lambda: len(tracker.batches) == len(ids) and all(b.created_at for b in tracker.batches.values())
            )
            sim.stats.reset()
            active = tracker.active()
            assert len(active) > len(ids) / 2  # backdated batches may have finished already
            for batch in active:
                batch.next_due = 0.0
            runner.wake()
            await eventually(lambda: all(b.next_due > 0 for b in active))
        return sim.stats.as_dict()
