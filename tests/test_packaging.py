"""What ships with the package: the licence and metadata, the example config and the systemd unit inside
the wheel and printed by `batch-poller config`, the config's JSON Schema against docs/configuration.md,
and the shell completion scripts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest

from poller.cli.config_cmd import PACKAGED
from tests.helpers import cli_env

ROOT = Path(__file__).resolve().parent.parent
#: The source of truth of each packaged file (poller/data/ links to them).
SOURCES = {"example": ROOT / "config" / "config.example.toml", "unit": ROOT / "systemd" / "batch-poller.service"}
COMMANDS = ("run", "track", "list", "status", "deliveries", "config", "completion")


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "poller.cli", *args], check=False, capture_output=True, env=cli_env(), timeout=60
    )


# -- metadata ----------------------------------------------------------------------------------------


def test_pyproject_declares_an_spdx_licence_urls_classifiers_and_keywords() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert {"Homepage", "Documentation", "Changelog"} <= set(project["urls"])
    assert all(u.startswith("https://github.com/batch-poller/batch-poller") for u in project["urls"].values())
    assert project["keywords"]
    # SPDX license expressions replace the licence classifiers (PEP 639): having both is an error
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    assert "MIT License" in (ROOT / "LICENSE").read_text(encoding="utf-8")


def test_changelog_keeps_a_changelog_format() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in text
    assert re.search(r"^## \[0\.1\.0\] - \d{4}-\d{2}-\d{2}$", text, re.MULTILINE)
    headings = set(re.findall(r"^### (\w+)$", text, re.MULTILINE))
    assert headings <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, headings
    for ref in re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE):
        assert re.search(rf"^\[{re.escape(ref)}\]: https://", text, re.MULTILINE), f"no link for [{ref}]"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from a copy of the source tree (the build writes build/ and *.egg-info next to it)."""
    tree = tmp_path_factory.mktemp("src") / "batch-poller"
    shutil.copytree(
        ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(".git", ".venv", "*_cache", "__pycache__", "build")
    )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check", "-w", out, tree],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("batch_poller-*.whl")
    return zipfile.ZipFile(path)


@pytest.mark.slow
def test_the_wheel_ships_the_example_config_the_unit_and_the_licence(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    for what, source in SOURCES.items():
        assert wheel.read(f"poller/data/{PACKAGED[what]}") == source.read_bytes(), what
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(wheel.read(meta_name).decode())
    assert meta["License-Expression"] == "MIT"
    assert "Changelog, https://github.com/batch-poller/batch-poller/blob/main/CHANGELOG.md" in meta.get_all(
        "Project-URL", []
    )
    assert "Requires-Dist: shtab" in wheel.read(meta_name).decode()


@pytest.mark.slow
def test_the_wheel_ships_the_dashboard(wheel: zipfile.ZipFile) -> None:
    static = ROOT / "poller" / "service" / "static"
    files = sorted(p.name for p in static.iterdir())
    assert {"index.html", "dashboard.css", "dashboard.js"} <= set(files)
    for name in files:
        assert wheel.read(f"poller/service/static/{name}") == (static / name).read_bytes(), name


@pytest.mark.slow
def test_an_installed_wheel_prints_its_packaged_files(wheel: zipfile.ZipFile, tmp_path: Path) -> None:
    """The wheel unpacked (as pip installs a pure-Python wheel) and imported ahead of this checkout."""
    site = tmp_path / "site"
    wheel.extractall(site)
    env = cli_env({"PYTHONPATH": str(site)})
    where = subprocess.run(
        [sys.executable, "-c", "import poller; print(poller.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    for what, source in SOURCES.items():
        result = subprocess.run(
            [sys.executable, "-m", "poller.cli", "config", what],
            check=False,
            capture_output=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == source.read_bytes(), what


# -- batch-poller config -----------------------------------------------------------------------------


@pytest.mark.parametrize("what", sorted(SOURCES))
def test_config_prints_the_repository_file_byte_for_byte(what: str) -> None:
    result = cli("config", what)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SOURCES[what].read_bytes()


def test_config_needs_no_config_file() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poller.cli", "--config", "/nonexistent/config.toml", "config", "schema"],
        check=False,
        capture_output=True,
        env=cli_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["additionalProperties"] is False


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> list[dict[str, Any]]:
    """The object schemas `node` stands for: through $ref, anyOf/oneOf (unions, Optional) and array items."""
    if "$ref" in node:
        return _resolve(schema, schema["$defs"][node["$ref"].rsplit("/", 1)[1]])
    if "properties" in node:
        return [node]
    found: list[dict[str, Any]] = []
    for key in ("anyOf", "oneOf"):
        for option in node.get(key, []):
            found += _resolve(schema, option)
    if node.get("type") == "array" and "items" in node:
        found += _resolve(schema, node["items"])
    return found


def schema_keys() -> dict[str, set[str]]:
    """Per config table, every key the schema allows in it (a source or sink of any kind)."""
    schema = json.loads(cli("config", "schema").stdout)
    keys: dict[str, set[str]] = {}
    for table, node in schema["properties"].items():
        name = "sources" if table == "source" else table  # the 0.1 [source] is one more source
        for model in _resolve(schema, node):
            keys.setdefault(name, set()).update(model["properties"])
    return keys


def documented_keys() -> dict[str, set[str]]:
    """Per `## `[table]`` section of docs/configuration.md, the keys named in its tables' Key column."""
    keys: dict[str, set[str]] = {}
    section: str | None = None
    column: int | None = None
    for line in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## `\[{1,2}(\w+)\]{1,2}`", line)
        if heading:
            section, column = heading.group(1), None
            continue
        if line.startswith("## "):
            section = None
        if section is None or not line.startswith("|"):
            column = None if not line.startswith("|") else column
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            column = cells.index("Key") if "Key" in cells else -1
            continue
        if column < 0 or set(cells[0]) <= set("-: "):
            continue
        keys.setdefault(section, set()).update(re.findall(r"`([a-z_]+)`", cells[column]))
    return keys


def test_the_json_schema_and_the_configuration_reference_name_the_same_keys() -> None:
    schema, docs = schema_keys(), documented_keys()
    assert set(schema) == set(docs), (sorted(schema), sorted(docs))
    problems = []
    for table in sorted(schema):
        problems += [f"{table}.{k}: in the schema, not in docs" for k in sorted(schema[table] - docs[table])]
        problems += [f"{table}.{k}: in docs, not in the schema" for k in sorted(docs[table] - schema[table])]
    assert not problems, "docs/configuration.md's reference tables and the schema disagree:\n" + "\n".join(problems)


# -- completion --------------------------------------------------------------------------------------


def test_bash_completion_sources_and_registers_the_command(tmp_path: Path) -> None:
    script = cli("completion", "bash")
    assert script.returncode == 0, script.stderr
    path = tmp_path / "batch-poller.bash"
    path.write_bytes(script.stdout)
    result = subprocess.run(
        ["bash", "-c", f"source {path} && complete -p batch-poller"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("complete ")
    assert result.stdout.rstrip().endswith(" batch-poller")
    text = script.stdout.decode()
    for command in COMMANDS:
        assert command in text, command


def test_zsh_completion_names_the_command_and_its_subcommands() -> None:
    script = cli("completion", "zsh")
    assert script.returncode == 0, script.stderr
    text = script.stdout.decode()
    assert text.startswith("#compdef batch-poller")
    for command in COMMANDS:
        assert re.search(rf"^\s*{command}:'", text, re.MULTILINE), command
