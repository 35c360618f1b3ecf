"""The user documentation against the code: links resolve, and every config key, CLI flag, metric,
HTTP route, simulator admin route and event field the code has is documented where the docs say."""

from __future__ import annotations

import argparse
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, get_args

import pytest
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

from poller.cli import _parser
from poller.config import Config, load_config, parse_config
from poller.config.settings import LogConfig, PollConfig, ServiceConfig, StateConfig
from poller.config.sinks import SinkConfig
from poller.config.sources import AzureSourceConfig, OpenAISourceConfig
from poller.domain.events import Event, EventData
from poller.metrics import Metrics
from poller.service.app import Service
from poller.sim import OpenAISim

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIGS = sorted((ROOT / "config").glob("*.toml"))
UNIT = ROOT / "systemd" / "batch-poller.service"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
#: The providers docs/configuration.md documents; each adds keys to the ones every source has.
DOCUMENTED_SOURCES: tuple[type[BaseModel], ...] = (OpenAISourceConfig, AzureSourceConfig)
SECTIONS: tuple[type[BaseModel], ...] = (PollConfig, StateConfig, LogConfig, ServiceConfig)
SINKS: tuple[type[BaseModel], ...] = get_args(get_args(SinkConfig)[0])

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")
PARAM = re.compile(r"\{[^}]*\}")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BATCH_POLLER_* variable of the developer's shell changes what the configs load as."""
    for name in list(os.environ):
        if name.startswith("BATCH_POLLER_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in {"L", "N"})
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in prose(path):
        match = re.match(r"^(#{1,6})\s+(.*)$", line)
        if match:
            base = slug(match.group(2))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def fields(*models: type[BaseModel]) -> set[str]:
    return {name for model in models for name in model.model_fields}


def text(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


# -- links -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for line in prose(page):
        for target in LINK.findall(line):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_links_every_docs_page() -> None:
    readme = README.read_text(encoding="utf-8")
    missing = [p.name for p in DOCS.glob("*.md") if f"(docs/{p.name}" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_readme_keeps_the_two_commands() -> None:
    readme = README.read_text(encoding="utf-8")
    assert "make demo    # a simulated Batch API plus the daemon" in readme
    assert "make test    # the whole test suite" in readme
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.MULTILINE)
    assert re.search(r"^test:", makefile, re.MULTILINE)


# -- configuration -----------------------------------------------------------------------------------


def test_every_config_key_is_in_configuration_md() -> None:
    doc = text("configuration.md")
    keys = fields(*DOCUMENTED_SOURCES, *SECTIONS, *SINKS)
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"docs/configuration.md does not document {missing}"
    for table in ("[[sources]]", "[source]", "[poll]", "[state]", "[log]", "[service]", "[[sinks]]"):
        assert f"`{table}`" in doc, table
    assert set(Config.model_fields) == {"source", "sources", "poll", "state", "log", "service", "sinks"}


def test_every_config_key_is_in_the_example_config() -> None:
    example = (ROOT / "config" / "config.example.toml").read_text(encoding="utf-8")
    keys = fields(*DOCUMENTED_SOURCES, *SECTIONS, *SINKS)
    missing = sorted(k for k in keys if not re.search(rf"^\s*(#\s*)?{k}\s*=", example, re.MULTILINE))
    assert not missing, f"config/config.example.toml does not list {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_the_systemd_config_needs_only_credentials_the_unit_loads(tmp_path: Path) -> None:
    unit = UNIT.read_text(encoding="utf-8")
    loaded = set(re.findall(r"^LoadCredential=([^:]+):", unit, re.MULTILINE))
    config = load_config(ROOT / "config" / "systemd.toml")
    for name in loaded:
        (tmp_path / name).write_text("whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\n", encoding="utf-8")
    # No environment variable at all: an unedited install must start from credentials alone.
    config.check_secrets({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    for source in config.named_sources().values():
        assert source.api_key_file is not None
        assert str(source.api_key_file) in loaded
    doc = text("systemd.md")
    assert "config/systemd.toml /etc/batch-poller/config.toml" in doc


def test_sink_names_are_as_documented() -> None:
    config = parse_config(
        {"sinks": [{"kind": "stdout"}, {"kind": "file", "path": "x"}, {"kind": "stdout"}, {"kind": "stdout"}]}
    )
    assert list(config.named_sinks()) == ["stdout", "file", "stdout-2", "stdout-3"]
    assert "`stdout`, `file`, `stdout-2`, `stdout-3`" in text("configuration.md")


# -- command line ------------------------------------------------------------------------------------


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_every_command_and_flag_is_in_cli_md() -> None:
    doc = text("cli.md")
    headings = anchors(DOCS / "cli.md")
    missing = []
    for name, parser in commands().items():
        if f"`{name}" not in doc or not any(name in h for h in headings):
            missing.append(name)
        missing += [f"{name} {flag}" for flag in sorted(options(parser)) if flag not in doc]
    assert not missing, f"docs/cli.md does not document {missing}"


def test_every_simulate_flag_is_in_simulator_md() -> None:
    doc = text("simulator.md")
    missing = [flag for flag in sorted(options(commands()["simulate"])) if f"`{flag}`" not in doc]
    assert not missing, f"docs/simulator.md does not document {missing}"


# -- metrics, HTTP routes, events --------------------------------------------------------------------


def test_every_metric_and_its_labels_are_in_metrics_md() -> None:
    lines = text("metrics.md").splitlines()
    wrappers = [m for m in vars(Metrics()).values() if isinstance(m, MetricWrapperBase)]
    assert wrappers
    missing = []
    for metric in wrappers:
        name: str = metric._name
        row = next((ln for ln in lines if re.search(rf"`{name}(_total)?`", ln) and ln.startswith("|")), None)
        if row is None:
            missing.append(name)
            continue
        missing += [f"{name}{{{label}}}" for label in metric._labelnames if f"`{label}`" not in row]
    assert not missing, f"docs/metrics.md does not document {missing}"


def routes(app: Any) -> set[str]:
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = PARAM.sub("{}", route.resource.canonical)
        found.add(f"{route.method} {path}")
    return found


def documented(doc: str) -> set[str]:
    """`METHOD /path` mentions in a page, with path parameters unnamed."""
    return {
        f"{method} {PARAM.sub('{}', path)}" for method, path in re.findall(r"`(GET|POST|DELETE|PUT) (/[^`?\s]*)", doc)
    }


def test_every_service_route_is_in_service_md() -> None:
    app = Service(backend=None, config=ServiceConfig())._app()  # type: ignore[arg-type]
    missing = routes(app) - documented(text("service.md"))
    assert not missing, f"docs/service.md does not document {sorted(missing)}"


def test_every_simulator_admin_route_is_in_simulator_md() -> None:
    admin = {r for r in routes(OpenAISim().app()) if " /_sim/" in r}
    assert admin
    missing = admin - documented(text("simulator.md"))
    assert not missing, f"docs/simulator.md does not document {sorted(missing)}"


def test_every_event_field_is_in_events_md() -> None:
    doc = text("events.md")
    missing = [f for f in Event.model_fields if f != "data" and f"`{f}`" not in doc]
    missing += [f"data.{f}" for f in EventData.model_fields if f"`data.{f}`" not in doc]
    assert not missing, f"docs/events.md does not document {missing}"
