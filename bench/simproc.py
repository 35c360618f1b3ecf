"""The simulated Batch API in its own process, so its CPU is never counted against the client measured.

`python -m bench.simproc --batches N --ids-out FILE` creates N batches that stay in progress for hours
(their request counts keep moving, as real ones do), writes their ids to FILE, serves on a free loopback
port and prints ``READY <base url>`` once it accepts connections. With `--phase validating` the batches
stay validating for hours instead: first sight of one is a single event (`batch.validating`), where an
in-progress one is two (`batch.validating`, reconstructed from `created_at`, then `batch.in_progress`).
With `--phase transitions --lead L --span S` they are created validating when the simulator starts and each
starts running at a uniformly random moment between L and L + S seconds later (a steady stream of
N / S transitions a second); `--changes-out FILE` writes when each batch's change happens (epoch seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

from poller.sim import OpenAISim, SimClock, SimProfile, serve

#: Every batch is created 5 to 65 minutes ago, is past validation and runs for 11 to 22 more hours: a full
#: refresh sees only active batches, a share of whose request counts moved since the previous one.
STEADY = SimProfile(
    validating_s=(5.0, 60.0),
    in_progress_s=(40_000.0, 80_000.0),
    finalizing_s=(5.0, 300.0),
    p_failed=0.0,
    p_expired=0.0,
    requests=(100, 20_000),
)
#: Every batch validates for 5 to 6 hours (the most a 24 h window allows): first sight sees only validating.
VALIDATING = replace(STEADY, validating_s=(18_000.0, 21_600.0))
PROFILES = {"in_progress": STEADY, "validating": VALIDATING}
CREATED_AGO = 300.0
SPREAD = 3600.0


def steady_sim(batches: int, seed: int = 1, phase: str = "in_progress") -> tuple[OpenAISim, list[str]]:
    """A simulator holding exactly `batches` active batches (so they are the newest N), and their ids.

    `phase` is the status they all stay in for hours: "in_progress" or "validating".
    """
    sim = OpenAISim(clock=SimClock(speed=1.0), profile=PROFILES[phase], seed=seed)
    ids = sim.create_batches(batches, created_at=sim.now() - CREATED_AGO, spread=SPREAD)
    return sim, ids


def transitions_sim(batches: int, lead: float, span: float, seed: int = 1) -> tuple[OpenAISim, list[str]]:
    """`batches` batches created validating now, each starting to run between `lead` and `lead + span` s from now."""
    sim = OpenAISim(clock=SimClock(speed=1.0), profile=replace(STEADY, validating_s=(lead, lead + span)), seed=seed)
    ids = sim.create_batches(batches, created_at=sim.now())
    return sim, ids


async def _serve(sim: OpenAISim) -> None:
    async with serve(sim) as url:
        sys.stdout.write(f"READY {url}\n")
        sys.stdout.flush()
        with suppress(asyncio.CancelledError):
            await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ids-out", type=Path, required=True)
    parser.add_argument("--phase", choices=[*sorted(PROFILES), "transitions"], default="in_progress")
    parser.add_argument("--lead", type=float, default=20.0)
    parser.add_argument("--span", type=float, default=20.0)
    parser.add_argument("--changes-out", type=Path)
    args = parser.parse_args()
    if args.phase == "transitions":
        sim, ids = transitions_sim(args.batches, args.lead, args.span, args.seed)
    else:
        sim, ids = steady_sim(args.batches, args.seed, args.phase)
    args.ids_out.write_text(json.dumps(ids))
    if args.changes_out is not None:
        args.changes_out.write_text(json.dumps({i: sim.record(i).t_in_progress for i in ids}))
    loop = asyncio.new_event_loop()
    task = loop.create_task(_serve(sim))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with suppress(KeyboardInterrupt):
        loop.run_until_complete(task)
    loop.close()


if __name__ == "__main__":
    main()
