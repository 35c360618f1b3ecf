"""`batch-poller demo`: simulated Batch APIs of three providers and the daemon in one process, no API key
and no broker needed.

About ten OpenAI batches run through realistic lifecycles on a fast clock (one fails, one expires, one is
cancelled), beside a few Anthropic Message Batches and Gemini batch jobs; one daemon polls all three
sources and prints each transition live through the stdout sink, then a summary per source.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

from poller.config import Config, parse_config
from poller.runtime.daemon import Daemon
from poller.sim import OpenAISim, SimClock, SimProfile, serve
from poller.sim.anthropic import AnthropicSim
from poller.sim.base import SimApi
from poller.sim.gemini import GeminiSim
from poller.store import ACTIVE, open_store
from poller.store.base import Store

DEMO_KEY_ENV = "BATCH_POLLER_DEMO_KEY"
SPEED = 20.0  # simulated seconds per real second
#: Batches on each of the other two providers.
OTHERS = 3


def demo_config(base_urls: dict[str, str], state_dir: Path) -> Config:
    """The demo's config: one source per simulated provider, named after it."""
    sources = [
        {"provider": name, "name": name, "base_url": url, "api_key_env": DEMO_KEY_ENV}
        for name, url in base_urls.items()
    ]
    return parse_config(
        {
            "sources": sources,
            "poll": {
                "validating": "1s",
                "in_progress": "1s",
                "finalizing": "1s",
                "cancelling": "1s",
                "max_interval": "3s",
                "progress_interval": "4s",
                "error_backoff": "1s",
                "max_requests_per_second": 50,
            },
            "state": {"path": str(state_dir / "state.db")},
            "log": {"level": "warning"},
            "service": {"enabled": False},
            "sinks": [{"kind": "stdout", "format": "text"}],
        }
    )


def _populate(sim: OpenAISim, count: int) -> list[str]:
    now = sim.now()
    ids = [sim.create_batch(metadata={"demo": "yes", "n": str(i)})["id"] for i in range(max(count - 3, 1))]
    ids.append(sim.create_batch(metadata={"demo": "yes", "n": "failing"}, outcome="failed")["id"])
    # Backdated so that it runs out of its 24 h window within the demo: expiring, then expired.
    ids.append(
        sim.create_batch(metadata={"demo": "yes", "n": "late"}, created_at=now - 86_400 + 240, outcome="expired")["id"]
    )
    ids.append(sim.create_batch(metadata={"demo": "yes", "n": "cancel-me"}, outcome="completed")["id"])
    return ids


def _sims(speed: float) -> dict[str, SimApi]:
    # No random expiry: an expired batch waits out its 24 h window; the demo backdates its one late batch.
    profile = SimProfile(
        validating_s=(5, 40), in_progress_s=(120, 480), finalizing_s=(10, 60), cancelling_s=(10, 40), p_expired=0.0
    )
    seed = int(time.time())
    kinds: dict[str, Any] = {"openai": OpenAISim, "anthropic": AnthropicSim, "gemini": GeminiSim}
    return {
        name: cls(clock=SimClock(speed=speed), profile=profile, seed=seed + i)
        for i, (name, cls) in enumerate(kinds.items())
    }


@asynccontextmanager
async def _serving(sims: dict[str, SimApi]) -> AsyncIterator[dict[str, str]]:
    async with AsyncExitStack() as stack:
        yield {name: await stack.enter_async_context(serve(sim)) for name, sim in sims.items()}


async def run_demo(count: int = 10, deadline: float = 90.0, out: TextIO | None = None, speed: float = SPEED) -> int:
    """Run the demo; returns 0 when every batch reached a final status and every event was delivered."""
    out = out or sys.stdout
    sims = _sims(speed)
    openai = sims["openai"]
    assert isinstance(openai, OpenAISim)
    with tempfile.TemporaryDirectory(prefix="batch-poller-demo-") as tmp:
        async with _serving(sims) as base_urls:
            ids = {"openai": _populate(openai, count)}
            ids |= {name: sim.new_batches(OTHERS, {}) for name, sim in sims.items() if name != "openai"}
            config = demo_config(base_urls, Path(tmp))
            daemon = Daemon(config, environ={DEMO_KEY_ENV: "sk-sim"})
            shown = ", ".join(f"{len(v)} on {k}" for k, v in ids.items())
            print(f"demo: simulated Batch APIs of three providers ({speed:g}x speed): {shown}\n", file=out)
            out.flush()
            runner = asyncio.create_task(daemon.run(), name="poller.demo.daemon")
            await daemon.ready.wait()
            for name, batch_ids in ids.items():
                runner_of = daemon.runner(name)
                await runner_of.track(batch_ids, "cli")
                ids[name] = runner_of.canonical(batch_ids)  # Gemini's `batches/abc` is `abc`
            started = time.monotonic()
            cancelled = False
            while time.monotonic() - started < deadline and not runner.done():
                await asyncio.sleep(0.5)
                if not cancelled and time.monotonic() - started > 120 / speed:
                    openai.cancel(ids["openai"][-1])  # as `batch-poller cancel` would, through the API
                    cancelled = True
                if await _finished(daemon.store):
                    break
            daemon.stop()
            code = await runner
            async with open_store(config.state) as store:
                return await _summary(store, ids, out) or code


async def _finished(store: Store) -> bool:
    if await store.batches(states=[ACTIVE]):
        return False
    return not await store.deliveries(states=("pending",))


async def _summary(store: Store, ids: dict[str, list[str]], out: TextIO) -> int:
    print("\nsummary", file=out)
    unfinished = 0
    total = 0
    for source, batch_ids in ids.items():
        rows = {b.id: b for b in await store.batches(source)}
        types: Counter[str] = Counter()
        for batch_id in batch_ids:
            types.update(e["type"] for e in await store.events_for(source, batch_id))
        finals = Counter(rows[i].knowledge.status for i in batch_ids if i in rows)
        print(f"  {source}: " + ", ".join(f"{n} {s}" for s, n in sorted(finals.items(), key=str)), file=out)
        print("    events: " + ", ".join(f"{n} {t}" for t, n in sorted(types.items())), file=out)
        unfinished += sum(1 for i in batch_ids if i not in rows or rows[i].state == ACTIVE)
        total += sum(types.values())
    pending = await store.deliveries(states=("pending",))
    if unfinished or pending:
        print(f"  NOT DONE: {unfinished} batch(es) still active, {len(pending)} event(s) undelivered", file=out)
        return 1
    print(f"  every batch reached a final status; {total} events delivered", file=out)
    return 0
