"""`python -m poller.sim` (also `batch-poller simulate`): run a simulated Batch API on a local port."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Sequence
from contextlib import suppress

from poller.sim.anthropic import AnthropicSim
from poller.sim.base import DEFAULT_KEY, SimApi, serve_forever
from poller.sim.clock import SimClock
from poller.sim.gemini import GeminiSim
from poller.sim.mistral import MistralSim
from poller.sim.openai import OpenAISim
from poller.sim.openrouter import OpenRouterSim
from poller.sim.together import TogetherSim

#: Simulators by provider name; each takes clock, seed and api_keys.
SIMULATORS: dict[str, Callable[..., SimApi]] = {
    "openai": OpenAISim,
    "mistral": MistralSim,
    "together": TogetherSim,
    "openrouter": OpenRouterSim,
    "anthropic": AnthropicSim,
    "gemini": GeminiSim,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", choices=sorted(SIMULATORS), default="openai", help="which API (default openai)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8089, help="port (default 8089; 0 picks a free one)")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lifecycles drawn (default 0)")
    parser.add_argument("--batches", type=int, default=0, help="batches to create at start (default 0)")


def run(args: argparse.Namespace) -> int:
    sim = SIMULATORS[args.provider](clock=SimClock(speed=args.speed), seed=args.seed)
    sim.new_batches(args.batches, {})

    def ready(url: str) -> None:
        print(f"{args.provider} batch API simulator at {url} (admin under /_sim/), API key {DEFAULT_KEY}", flush=True)

    with suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(sim, args.host, args.port, ready))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poller.sim", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
