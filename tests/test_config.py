"""Configuration: durations, validation errors that name the key and the fix, secrets, env overrides, files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from poller.config import Config, load_config, parse_config, read_secret
from poller.durations import parse_duration
from poller.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "config.example.toml"
LEAKY = "sk-live-DO-NOT-PRINT-1234567890"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BATCH_POLLER_* or credential variables of the developer's shell leak into these tests."""
    for name in list(os.environ):
        if name.startswith("BATCH_POLLER_") or name in {
            "OPENAI_API_KEY",
            "AZURE_OPENAI_API_KEY",
            "CREDENTIALS_DIRECTORY",
        }:
            monkeypatch.delenv(name)


def config_error(raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value


# -- durations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (45, 45.0),
        (2.5, 2.5),
        ("45", 45.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2d", 172_800.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        (" 10s ", 10.0),
    ],
)
def test_durations_accepted(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)
    assert parse_config({"poll": {"stall_after": value}}).poll.stall_after == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("5x", id="unknown-unit"),
        pytest.param("s", id="unit-only"),
        pytest.param("", id="empty"),
        pytest.param("5s5", id="trailing-number"),
        pytest.param("1h 30x", id="partly-valid"),
        pytest.param(-1, id="negative-number"),
        pytest.param("-5s", id="negative-string"),
        pytest.param("-5", id="negative-numeric-string"),
        pytest.param(True, id="true"),
        pytest.param(False, id="false"),
        pytest.param(None, id="none"),
        pytest.param([30], id="list"),
        pytest.param("nan", id="nan-string"),
        pytest.param(float("nan"), id="nan-float"),
    ],
)
def test_durations_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)
    error = config_error({"poll": {"stall_after": value}})
    assert error.key == "poll.stall_after"
    assert error.fix


# -- validation errors -------------------------------------------------------------------------------


def test_unknown_key_names_it_and_the_fix() -> None:
    error = config_error({"poll": {"in_progress": "30s", "bogus": 1}})
    assert error.key == "poll.bogus"
    rendered = error.render()
    assert "poll.bogus" in rendered
    assert error.fix
    assert error.fix in rendered
    assert "fix" in rendered


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        pytest.param({"bogus": True}, "bogus", id="top-level"),
        pytest.param({"source": {"api_kee_env": "X"}}, "source.api_kee_env", id="misspelt"),
        pytest.param({"log": {"colour": "red"}}, "log.colour", id="log"),
    ],
)
def test_unknown_keys_anywhere(raw: dict[str, Any], key: str) -> None:
    assert config_error(raw).key == key


def test_unknown_key_inside_a_sink_points_into_sinks() -> None:
    error = config_error({"sinks": [{"kind": "stdout", "name": "out", "colour": "red"}]})
    assert error.key.startswith("sinks")
    assert error.key.endswith("colour")


def test_bad_sink_kind() -> None:
    error = config_error({"sinks": [{"kind": "carrier-pigeon"}]})
    assert error.key.startswith("sinks")
    for kind in ("stdout", "file", "mqtt", "webhook"):
        assert kind in error.render()


def test_duplicate_sink_names() -> None:
    error = config_error(
        {"sinks": [{"kind": "file", "name": "audit", "path": "/tmp/a"}, {"kind": "stdout", "name": "audit"}]}
    )
    assert "audit" in error.render()
    assert error.fix


def test_distinct_sink_names_are_fine() -> None:
    config = parse_config(
        {"sinks": [{"kind": "file", "name": "audit", "path": "/tmp/a"}, {"kind": "stdout", "name": "screen"}]}
    )
    assert list(config.named_sinks()) == ["audit", "screen"]


# -- secrets -----------------------------------------------------------------------------------------


def test_missing_secret_env_names_the_key_and_leaks_nothing() -> None:
    config = parse_config({"source": {"api_key_env": "MY_OPENAI_KEY"}})
    environ = {"OPENAI_API_KEY": LEAKY, "OTHER_SECRET": LEAKY + "-2", "PATH": "/usr/bin"}
    with pytest.raises(ConfigError) as info:
        config.check_secrets(environ)
    error = info.value
    assert error.key == "source.api_key_env"
    assert "MY_OPENAI_KEY" in error.render()
    for text in (str(error), error.render(), error.problem, error.fix, repr(error.value)):
        assert LEAKY not in text


def test_default_secret_env_is_openai_api_key() -> None:
    config = parse_config({})
    with pytest.raises(ConfigError) as info:
        config.source.api_key({})
    assert info.value.key == "source.api_key_env"
    assert "OPENAI_API_KEY" in info.value.render()
    assert config.source.api_key({"OPENAI_API_KEY": " sk-test \n"}) == "sk-test"


def test_secret_file_relative_to_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "openai").write_text("sk-from-file\n", encoding="utf-8")
    config = parse_config({"source": {"api_key_file": "openai"}})
    assert config.source.api_key({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "sk-from-file"


def test_secret_file_absolute_path_ignores_credentials_directory(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "key"
    secret.parent.mkdir()
    secret.write_text("sk-absolute", encoding="utf-8")
    assert read_secret("source.api_key", None, secret, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "sk-absolute"


@pytest.mark.parametrize("content", [None, "", "  \n"], ids=["missing", "empty", "blank"])
def test_unreadable_or_empty_secret_file(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "openai").write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_secret("source.api_key", None, Path("openai"), {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert info.value.key == "source.api_key_file"
    assert info.value.fix


def test_both_secret_forms_is_an_error() -> None:
    error = config_error({"source": {"api_key_env": "A", "api_key_file": "/run/key"}})
    assert error.key.startswith("source")
    assert "api_key" in error.render()


def test_secret_looking_values_are_not_echoed() -> None:
    error = config_error({"source": {"api_key_env": LEAKY, "api_key_file": "/run/key"}})
    assert LEAKY not in error.render()
    assert LEAKY not in str(error)


# -- environment overrides ---------------------------------------------------------------------------


def test_env_overrides_toml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_POLLER_POLL__IN_PROGRESS", "7s")
    config = parse_config({"poll": {"in_progress": "30s", "validating": "3s"}})
    assert config.poll.in_progress == 7.0
    assert config.poll.validating == 3.0  # the rest of the TOML section survives the override


def test_env_override_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_POLLER_POLL__IN_PROGRESS", "soon")
    assert config_error({}).key == "poll.in_progress"


def test_config_path_variable_is_not_a_config_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """BATCH_POLLER_CONFIG names the file (find_config_path); it must not trip the unknown-key check."""
    monkeypatch.setenv("BATCH_POLLER_CONFIG", str(tmp_path / "config.toml"))
    assert isinstance(parse_config({}), Config)


# -- files -------------------------------------------------------------------------------------------


def test_load_config_reads_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[poll]\nin_progress = "1m"\n\n[[sinks]]\nkind = "stdout"\nformat = "text"\n', encoding="utf-8")
    config = load_config(path)
    assert config.poll.in_progress == 60.0
    assert [s.kind for s in config.sinks] == ["stdout"]


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.key == "--config"
    assert "nope.toml" in info.value.render()


def test_load_config_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[poll\nin_progress = \n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "--config"
    assert info.value.fix


def test_load_config_required_but_absent() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, require_file=True)
    assert info.value.key == "--config"


def test_load_config_validation_errors_keep_their_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[poll]\nbogus = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "poll.bogus"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="config/config.example.toml not written yet")
def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert isinstance(load_config(EXAMPLE), Config)


@pytest.mark.parametrize(
    ("sink", "secret"),
    [
        ({"kind": "webhook", "url": "ftp://hooks.slack.com/services/T0/B0/SECRETXYZ"}, "SECRETXYZ"),
        ({"kind": "mqtt", "url": "mqtt://user:hunter2@broker:1883"}, "hunter2"),
        ({"kind": "webhook", "url": "https://x", "headers": {"Authorization": 12345678}}, "12345678"),
    ],
)
def test_config_errors_never_echo_credentials_in_urls_or_headers(sink, secret) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sinks": [sink]})
    assert secret not in info.value.render()
