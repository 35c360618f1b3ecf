"""monitoring/: the Prometheus rules pass `promtool check rules` and their unit tests, and every metric
the rules and the Grafana dashboard name is one a running daemon exports on /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from poller.sim import serve
from tests.helpers import config_dict, eventually, fast_sim, make_config, read_jsonl, running

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus-rules.yml"
RULE_TESTS = MONITORING / "prometheus-rules.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
#: Series Prometheus makes itself for every target, not exported by the daemon.
SYNTHETIC = {"up"}
METRIC = re.compile(r"\b(batch_poller_[a-z0-9_]+)\b")
#: What every alert the issue asks for watches (daemon down, API failing, backlog, dead letters, stalls).
REQUIRED_ALERTS = {
    "BatchPollerDown": "up",
    "BatchPollerAbsent": "up",
    "BatchPollerSourceDown": "batch_poller_source_up",
    "BatchPollerApiErrors": "batch_poller_api_requests_total",
    "BatchPollerOutboxStuck": "batch_poller_outbox_oldest_pending_seconds",
    "BatchPollerOutboxGrowing": "batch_poller_outbox_pending",
    "BatchPollerDeadLetters": "batch_poller_outbox_dead",
    "BatchPollerBatchStalled": "batch_poller_stalled_batches",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `make system-deps` installs it (Debian: apt-get install prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], check=False, capture_output=True, text=True, cwd=MONITORING, timeout=120)


def rule_exprs() -> dict[str, str]:
    """Each alert's name and expression (a one-line `expr:` or an indented `expr: |` block)."""
    text = RULES.read_text(encoding="utf-8")
    exprs: dict[str, str] = {}
    for block in re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]:
        name, _, rest = block.partition("\n")
        match = re.search(r"^ *expr: (\|\n(?: {10,}\S.*\n)+|[^|\n].*)", rest, re.MULTILINE)
        assert match, name
        exprs[name.strip()] = match.group(1).removeprefix("|\n")
    return exprs


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, so promtool can parse it."""
    label_values = re.fullmatch(r"label_values\((.+), *\w+\)", expr)
    if label_values:
        expr = label_values.group(1)
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$source", ".*")


async def scrape_a_daemon(state: Path) -> str:
    """/metrics of a real daemon (its own service on a free loopback port) that polled one batch."""
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        raw = config_dict(url, state, [{"kind": "file", "name": "file", "path": str(state.with_suffix(".jsonl"))}])
        raw["source"]["track"] = sim.create_batches(1)
        raw["service"] = {"enabled": True, "listen": "127.0.0.1:0"}
        async with running(make_config(raw)) as daemon:
            assert daemon.service is not None
            await eventually(lambda: bool(read_jsonl(state.with_suffix(".jsonl"))))
            async with (
                aiohttp.ClientSession(base_url=daemon.service.url) as http,
                http.get("/metrics") as resp,
            ):
                assert resp.status == 200
                return await resp.text()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The sample names a running daemon's /metrics offers, from each family's TYPE line (a labelled family
    with no series yet still says its name and type) and from the samples themselves."""
    text = asyncio.run(scrape_a_daemon(tmp_path_factory.mktemp("daemon") / "state.db"))
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        base = name.removesuffix("_total") if kind == "counter" else name  # a counter's TYPE says `…_total`
        names.update(base + suffix for suffix in suffixes.get(kind, ("",)))
    names.update(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.MULTILINE))
    return {n for n in names if n.startswith("batch_poller_")}


# -- Prometheus rules --------------------------------------------------------------------------------


def test_promtool_check_rules_accepts_the_rules_file() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_cover_what_operators_need_and_each_has_a_unit_test() -> None:
    exprs = rule_exprs()
    for alert, metric in REQUIRED_ALERTS.items():
        assert alert in exprs, alert
        assert re.search(rf"\b{metric}\b", exprs[alert]), (alert, exprs[alert])
    tested = set(re.findall(r"^\s*alertname: (\w+)$", RULE_TESTS.read_text(encoding="utf-8"), re.MULTILINE))
    assert set(exprs) <= tested, f"no promtool test for {sorted(set(exprs) - tested)}"


def test_every_metric_the_rules_name_is_exported(exported: set[str]) -> None:
    named = {m for expr in rule_exprs().values() for m in METRIC.findall(expr)}
    assert named
    assert not named - exported, f"the rules name metrics the daemon does not export: {sorted(named - exported)}"


# -- Grafana dashboard -------------------------------------------------------------------------------


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    named = {m for _, expr in dashboard_exprs() for m in METRIC.findall(expr)}
    for metric in (
        "batch_poller_source_up",
        "batch_poller_api_requests_total",
        "batch_poller_tracked_batches",
        "batch_poller_events_total",
        "batch_poller_outbox_pending",
        "batch_poller_delivery_latency_seconds_bucket",
        "batch_poller_outbox_dead",
        "batch_poller_stalled_batches",
    ):
        assert metric in named, metric
    assert any("histogram_quantile(0.95" in expr for _, expr in dashboard_exprs())


def test_every_dashboard_expression_uses_only_exported_metrics(exported: set[str]) -> None:
    problems = []
    for where, expr in dashboard_exprs():
        names = METRIC.findall(expr)
        if not names:
            problems.append(f"{where}: names no batch-poller metric: {expr}")
        problems += [f"{where}: {name} is not exported" for name in names if name not in exported | SYNTHETIC]
    assert not problems, "\n".join(problems)


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression, as a recording rule of a throwaway rules file."""
    exprs = [as_promql(expr) for _, expr in dashboard_exprs()]
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        lines += [f"      - record: dashboard:expr{i}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
