"""Regenerates docs/dashboard.png: two simulated sources with batches at every stage, one failing sink,
the dashboard in Debian's chromium. Run with `make screenshot` (or `python -m tests.screenshot [PATH]`)."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from poller.sim import ManualClock, OpenAISim, SimProfile
from tests.helpers import eventually, read_jsonl
from tests.test_dashboard import browser
from tests.test_service import stack

OUT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
PROFILE = SimProfile(validating_s=(20, 60), in_progress_s=(1800, 7200), finalizing_s=(30, 120), p_expired=0.0)


async def main(out: Path) -> None:
    clocks = {"openai": ManualClock(), "azure-eu": ManualClock()}
    sims = {name: OpenAISim(clock=clock, profile=PROFILE, seed=i + 3) for i, (name, clock) in enumerate(clocks.items())}
    ids = {
        "openai": [
            *sims["openai"].create_batches(3, spread=3000),
            *sims["openai"].create_batches(1, spread=9000, outcome="completed"),
            *sims["openai"].create_batches(1, outcome="completed"),
        ],
        "azure-eu": [*sims["azure-eu"].create_batches(2, spread=2400), *sims["azure-eu"].create_batches(1)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        webhook = {"kind": "file", "name": "archive", "path": str(blocker / "events.jsonl")}
        async with stack(tmp_path, sims, extra_sinks=[webhook]) as st, browser() as chromium:
            for name, batch_ids in ids.items():
                await st.post({"ids": batch_ids, "source": name})
            total = sum(len(v) for v in ids.values())
            await eventually(lambda: len({e["data"]["id"] for e in read_jsonl(st.events)}) == total)
            page = await chromium.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
            await page.goto(st.service.url)
            await page.locator("tr[data-batch]").nth(total - 1).wait_for()
            for step in range(6):  # let the page see batches move, live
                for clock in clocks.values():
                    clock.advance(240 if step else 90)
                await asyncio.sleep(0.6)
            await page.locator("#sinks tr[data-sink='archive']").wait_for()
            await page.screenshot(path=out, full_page=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
