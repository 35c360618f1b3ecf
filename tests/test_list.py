"""`batch-poller list`, as a real subprocess: progress bars and ETAs on a terminal (a real pty), plain
columns when piped, `--json` with `progress` and `eta`; outside values never reach the terminal raw."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poller.cli.render import iso
from poller.domain.eta import pack_anchors
from poller.domain.snapshot import Counts
from poller.domain.transitions import Knowledge
from poller.store import open_store
from poller.store.base import FINAL, Write
from tests.helpers import cli_env, config_dict, on_a_terminal, write_toml

#: An id as a hostile API (or a typo) might send it: a colour escape, a bell, a bidi override.
HOSTILE = "batch_\x1b[31mred\x07\u202eevil"


async def seed(path: Path) -> tuple[Path, int]:
    """A config and a state file with a batch in progress (a measured pace), a final one and a hostile id."""
    state = path / "state.db"
    config = write_toml(path / "config.toml", config_dict("http://127.0.0.1:9/v1", state, []))
    now = time.time()
    async with open_store(state) as store:
        await store.track("openai", ["batch_running", "batch_done", HOSTILE], "cli", now)
        rows = {b.id: b for b in await store.batches()}
        running = rows["batch_running"]
        running.knowledge = Knowledge(
            status="in_progress",
            seen=frozenset({"validating", "in_progress"}),
            sequence=2,
            counts=Counts(total=1000, completed=490, failed=10),
            anchors=pack_anchors([(now - 100, 0), (now - 10, 500)]),  # 500 in 90 s: 500 more in 90 s
        )
        running.created_at = int(now - 120)
        done = rows["batch_done"]
        done.state, done.finished_at = FINAL, now
        done.knowledge = Knowledge(status="completed", sequence=3, counts=Counts(total=10, completed=10, failed=0))
        await store.record([Write(running), Write(done)], now)
    return config, running.knowledge.eta(now) or 0


def list_piped(config: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "poller.cli", "list", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
        check=True,
    )
    return result.stdout


def list_on_a_terminal(config: Path) -> str:
    """`list` with its stdout on a real pseudo-terminal; what it wrote there."""
    code, out = on_a_terminal([sys.executable, "-m", "poller.cli", "list", "--config", str(config)])
    assert code == 0, out
    return out.replace("\r\n", "\n")


@pytest.fixture
async def seeded(tmp_path: Path) -> tuple[Path, int]:
    return await seed(tmp_path)


def rows_by_id(text: str) -> dict[str, str]:
    header, *rows = text.splitlines()
    assert header.split()[:5] == ["ID", "SOURCE", "STATUS", "PROGRESS", "ETA"]
    return {row.split()[0]: row for row in rows}


def test_piped_list_prints_plain_columns_with_utc_etas(seeded: tuple[Path, int]) -> None:
    config, eta = seeded
    out = list_piped(config)
    rows = rows_by_id(out)
    assert rows["batch_running"].split()[2:5] == ["in_progress", "500/1000", iso(eta)]
    assert rows["batch_done"].split()[2:5] == ["completed", "10/10", "-"]
    assert "[#" not in out  # no bars
    assert "[." not in out
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "\u202e" not in out
    assert "batch_?[31mred??evil" in rows


def test_list_on_a_terminal_shows_bars_and_etas(seeded: tuple[Path, int]) -> None:
    config, eta = seeded
    out = list_on_a_terminal(config)
    rows = rows_by_id(out)
    assert "[######......]  50%" in rows["batch_running"]
    assert "500/1000" in rows["batch_running"]
    assert time.strftime("%H:%M", time.localtime(eta)) in rows["batch_running"]
    assert "(in " in rows["batch_running"]
    assert "[############] 100%" in rows["batch_done"]
    assert "\x1b" not in out
    assert "batch_?[31mred??evil" in rows


def test_json_list_has_progress_and_eta(seeded: tuple[Path, int]) -> None:
    config, eta = seeded
    records = {r["id"]: r for r in map(json.loads, list_piped(config, "--json").splitlines())}
    assert records["batch_running"]["progress"] == 0.5
    assert records["batch_running"]["eta"] == eta
    assert records["batch_running"]["request_counts"] == {"total": 1000, "completed": 490, "failed": 10}
    assert records["batch_done"]["progress"] == 1
    assert records["batch_done"]["eta"] is None
    assert records[HOSTILE]["progress"] is None  # JSON escapes it itself: the id stays as it is
    assert records[HOSTILE]["eta"] is None
