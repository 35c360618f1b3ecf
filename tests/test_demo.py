"""`batch-poller demo`, the README's first command: three simulated providers, every batch to its end."""

from __future__ import annotations

import io

from poller.demo import run_demo


async def test_the_demo_follows_every_batch_of_three_providers_to_its_end() -> None:
    out = io.StringIO()
    assert await run_demo(10, deadline=60, out=out, speed=60) == 0
    text = out.getvalue()
    assert "every batch reached a final status" in text
    for source in ("openai", "anthropic", "gemini"):
        assert f"  {source}: " in text
    [openai] = [line for line in text.splitlines() if line.startswith("  openai: ")]
    for outcome in ("cancelled", "expired", "failed"):  # the one it cancels, the late one, the failing one
        assert outcome in openai
