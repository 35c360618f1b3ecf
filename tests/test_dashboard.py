"""The dashboard at `/`, in a real browser: Debian's chromium driven by Playwright (never `playwright install`),
against the real service in front of a daemon polling a simulator."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from poller.config import ServiceConfig
from poller.sim import ManualClock, OpenAISim
from tests.helpers import FAST_PROFILE, eventually, read_jsonl
from tests.test_service import TOKEN, TOKEN_ENV, stack

CHROMIUM = "/usr/bin/chromium"
STATIC = Path(__file__).resolve().parent.parent / "poller" / "service" / "static"


@asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    assert shutil.which(CHROMIUM), "Debian's chromium is missing: `make system-deps` installs it"
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


def watch_errors(page: Page) -> list[str]:
    """Uncaught errors and console errors (a CSP refusal shows up here too)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return errors


def manual_sim(seed: int = 5) -> tuple[OpenAISim, ManualClock]:
    clock = ManualClock()
    return OpenAISim(clock=clock, profile=FAST_PROFILE, seed=seed), clock


async def test_batches_appear_and_status_changes_show_without_a_reload(tmp_path):
    sim, clock = manual_sim()
    ids = sim.create_batches(3, outcome="completed")
    config = ServiceConfig(listen="127.0.0.1:0", token_env=TOKEN_ENV)
    async with stack(tmp_path, sim, track=ids, service=config, environ={TOKEN_ENV: TOKEN}) as st, browser() as chromium:
        await eventually(lambda: len(read_jsonl(st.events)) == 3)
        page = await chromium.new_page()
        errors = watch_errors(page)
        await page.goto(f"{st.service.url}/?token={TOKEN}")
        assert "token" not in page.url  # taken out of the address bar once kept for the tab

        rows = {batch_id: page.locator(f'tr[data-batch="{batch_id}"]') for batch_id in ids}
        for row in rows.values():
            await expect(row.locator('td[data-label="Status"]')).to_have_text("validating")
        await expect(page.locator("section.source h3")).to_have_text(["openai"])
        await expect(page.locator("#connection")).to_have_text("live")
        await expect(page.locator('#sinks tr[data-sink="file"] td').nth(1)).to_have_text("ok")
        await expect(page.locator('#apis tr[data-source="openai"] td').nth(1)).to_have_text("ok")
        await page.evaluate("window.__sameDocument = true")

        clock.advance(25)  # every batch is running now
        for row in rows.values():
            await expect(row.locator('td[data-label="Status"]')).to_have_text("in_progress")
        await expect(page.locator("#events li").first).to_contain_text("batch.in_progress")
        progress = rows[ids[0]].locator("progress")
        await expect(progress).to_have_attribute("aria-label", re.compile(r"^\d+ of \d+ requests done$"))

        clock.advance(3600)  # and finished
        for row in rows.values():
            await expect(row.locator('td[data-label="Status"]')).to_have_text("completed")
            await expect(row.locator('td[data-label="Last event"]')).to_contain_text("batch.completed")
        # Every event is listed once: those replayed on load and those that came live.
        logged = await st.daemon.store.read_events(0, 1000)
        await expect(page.locator("#events li")).to_have_count(len(logged))
        assert await page.evaluate("window.__sameDocument") is True  # no reload happened
        await page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
        assert errors == []


async def test_the_page_asks_for_the_token_and_keeps_it_for_the_tab(tmp_path):
    sim, _ = manual_sim(seed=8)
    ids = sim.create_batches(1)
    config = ServiceConfig(listen="127.0.0.1:0", token_env=TOKEN_ENV)
    async with stack(tmp_path, sim, track=ids, service=config, environ={TOKEN_ENV: TOKEN}) as st, browser() as chromium:
        page = await chromium.new_page()
        await page.goto(f"{st.service.url}/")
        await expect(page.locator("#login")).to_be_visible()
        await page.get_by_label("Service token").fill("wrong")
        await page.get_by_role("button", name="Connect").click()
        await expect(page.locator("#login-error")).to_have_text("That token was refused.")
        await page.get_by_label("Service token").fill(TOKEN)
        await page.get_by_role("button", name="Connect").click()
        await expect(page.locator(f'tr[data-batch="{ids[0]}"]')).to_be_visible()
        await expect(page.locator("#login")).to_be_hidden()
        await page.reload()  # sessionStorage keeps it
        await expect(page.locator(f'tr[data-batch="{ids[0]}"]')).to_be_visible()


@pytest.mark.parametrize("width", [390, 700, 1000])
async def test_readable_on_a_phone_and_in_a_narrow_window(tmp_path, width):
    sim, clock = manual_sim(seed=9)
    ids = sim.create_batches(2)
    async with stack(tmp_path, sim, track=ids) as st, browser() as chromium:
        clock.advance(25)
        page = await chromium.new_page(viewport={"width": width, "height": 844}, is_mobile=width < 500)
        errors = watch_errors(page)
        await page.goto(st.service.url)
        for batch_id in ids:
            await expect(page.locator(f'tr[data-batch="{batch_id}"] td[data-label="Status"]')).to_have_text(
                "in_progress"
            )
        # Each row is a card: nothing is wider than the screen.
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert errors == []


async def test_outside_values_show_as_text_and_an_eta_when_the_api_has_one(tmp_path):
    sim, clock = manual_sim(seed=10)
    ids = sim.create_batches(2)
    hostile = '<img src=x onerror="window.__injected = 1">'
    async with stack(tmp_path, sim, track=ids) as st, browser() as chromium:
        clock.advance(25)
        await eventually(lambda: {e["data"]["status"] for e in read_jsonl(st.events)} == {"validating", "in_progress"})
        page = await chromium.new_page()
        errors = watch_errors(page)
        eta = int(time.time()) + 3 * 3600 + 150  # shown as 'in 3h 2m' for half a minute

        async def with_eta(route: Route) -> None:  # what /v1/batches answers once it estimates completion
            response = await route.fetch()
            body = await response.json()
            for view in body["data"]:
                if view["id"] == ids[0]:
                    view["eta"] = eta
            await route.fulfill(response=response, json=body)

        async def with_hostile_error(route: Route) -> None:  # a sink error quoting what a server sent back
            response = await route.fetch()
            body = await response.json()
            body["sinks"]["file"]["last_error"] = hostile
            await route.fulfill(response=response, json=body)

        await page.route("**/v1/batches", with_eta)
        await page.route("**/v1/status", with_hostile_error)
        await page.goto(st.service.url)
        first, second = (page.locator(f'tr[data-batch="{b}"] td[data-label="ETA"]') for b in ids)
        await expect(first).to_have_text("in 3h 2m")
        await expect(second).to_have_text("—")
        await expect(page.locator('#sinks tr[data-sink="file"] td').nth(4)).to_have_text(hostile)
        assert await page.locator("#sinks img").count() == 0
        assert await page.evaluate("window.__injected") is None
        assert errors == []


async def test_every_active_batch_shows_and_the_newest_finished_ones(tmp_path):
    sim, clock = manual_sim(seed=12)
    finished = sim.create_batches(22, outcome="completed")
    clock.advance(3600)
    running = sim.create_batches(2)
    async with stack(tmp_path, sim, track=finished + running) as st, browser() as chromium:
        await eventually(lambda: len({e["data"]["id"] for e in read_jsonl(st.events)}) == 24)
        page = await chromium.new_page()
        await page.goto(st.service.url)
        for batch_id in running:
            await expect(page.locator(f'tr[data-batch="{batch_id}"]')).to_be_visible()
        await expect(page.locator("tr[data-batch]")).to_have_count(2 + 20)
        await expect(page.locator("section.source")).to_contain_text("2 active, 24 in all")
        await expect(page.locator("section.source")).to_contain_text("and 2 older finished batches")


@pytest.mark.parametrize("name", ["index.html", "dashboard.css", "dashboard.js"])
async def test_the_files_come_from_this_service_only(tmp_path, name):
    async with stack(tmp_path, OpenAISim(clock=ManualClock())) as st:
        path = "/" if name == "index.html" else f"/static/{name}"
        async with st.http.get(path) as resp:
            assert resp.status == 200
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert await resp.read() == (STATIC / name).read_bytes()
        async with st.http.get("/static/nothing.js") as resp:
            assert resp.status == 404
    text = (STATIC / name).read_text()
    assert "http://" not in text  # no CDN: it works offline
    assert "https://" not in text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in text  # outside values go in with textContent only
