"""`batch-poller demo`: the simulator and the daemon in one process, no API key and no broker needed.

About ten batches run through realistic lifecycles on a fast clock (one fails, one expires, one is
cancelled); the daemon polls them and prints each transition live through the stdout sink, then a summary.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

from poller.config import Config, parse_config
from poller.daemon import Daemon
from poller.records import ACTIVE
from poller.sim import OpenAISim, SimClock, SimProfile, serve
from poller.store import Store

DEMO_KEY_ENV = "BATCH_POLLER_DEMO_KEY"
SPEED = 20.0  # simulated seconds per real second


def demo_config(base_url: str, state_dir: Path) -> Config:
    return parse_config(
        {
            "source": {"kind": "openai", "base_url": base_url, "api_key_env": DEMO_KEY_ENV, "name": "openai"},
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


async def run_demo(count: int = 10, deadline: float = 90.0, out: TextIO | None = None) -> int:
    """Run the demo; returns 0 when every batch reached a final status and every event was delivered."""
    out = out or sys.stdout
    profile = SimProfile(validating_s=(5, 40), in_progress_s=(120, 480), finalizing_s=(10, 60), cancelling_s=(10, 40))
    sim = OpenAISim(clock=SimClock(speed=SPEED), profile=profile, seed=int(time.time()))
    with tempfile.TemporaryDirectory(prefix="batch-poller-demo-") as tmp:
        async with serve(sim) as base_url:
            ids = _populate(sim, count)
            config = demo_config(base_url, Path(tmp))
            daemon = Daemon(config, environ={DEMO_KEY_ENV: "sk-sim"})
            print(f"demo: {len(ids)} batches on a simulated Batch API at {base_url} ({SPEED:g}x speed)\n", file=out)
            out.flush()
            runner = asyncio.create_task(daemon.run(), name="poller.demo.daemon")
            await daemon.ready.wait()
            daemon.store.track(daemon.source, ids, "cli", time.time())
            daemon.wake()
            started = time.monotonic()
            cancelled = False
            while time.monotonic() - started < deadline and not runner.done():
                await asyncio.sleep(0.5)
                if not cancelled and time.monotonic() - started > 6:
                    sim.cancel(ids[-1])  # as `batch-poller cancel` would, through the API
                    cancelled = True
                if _finished(daemon):
                    break
            daemon.stop()
            db_path = daemon.store.path
            code = await runner
            with Store(db_path) as store:
                return _summary(store, daemon.source, ids, out) or code


def _finished(daemon: Daemon) -> bool:
    store = daemon.store
    if store.batches(daemon.source, states=[ACTIVE]):
        return False
    return not any(d.state == "pending" for d in store.deliveries())


def _summary(store: Store, source: str, ids: list[str], out: TextIO) -> int:
    rows = {b.id: b for b in store.batches(source)}
    types: Counter[str] = Counter()
    for batch_id in ids:
        types.update(e["type"] for e in store.events_for(source, batch_id))
    pending = [d for d in store.deliveries() if d.state == "pending"]
    print("\nsummary", file=out)
    finals = Counter(rows[i].knowledge.status for i in ids if i in rows)
    print("  batches: " + ", ".join(f"{n} {s}" for s, n in sorted(finals.items(), key=str)), file=out)
    print("  events:  " + ", ".join(f"{n} {t}" for t, n in sorted(types.items())), file=out)
    unfinished = [i for i in ids if i not in rows or rows[i].state == ACTIVE]
    if unfinished or pending:
        print(f"  NOT DONE: {len(unfinished)} batch(es) still active, {len(pending)} event(s) undelivered", file=out)
        return 1
    print(f"  every batch reached a final status; {sum(types.values())} events delivered", file=out)
    return 0
