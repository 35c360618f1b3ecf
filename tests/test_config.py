"""Configuration: durations, validation errors that name the key and the fix, sources (`[[sources]]` and the
legacy `[source]`), sink names, sink checks, state and service settings, secrets, env overrides, files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pydantic
import pytest

from poller.config import (
    AzureSourceConfig,
    Config,
    MqttSinkConfig,
    OpenAISourceConfig,
    ServiceConfig,
    StateConfig,
    WebhookSinkConfig,
    load_config,
    parse_config,
    read_secret,
    webhook_secrets,
)
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


# -- sources -----------------------------------------------------------------------------------------


def two_sources() -> dict[str, Any]:
    return {
        "sources": [
            {
                "name": "main",
                "provider": "openai",
                "base_url": "https://api.groq.com/openai/v1/",
                "api_key_env": "GROQ_KEY",
                "organization": "org-1",
                "project": "proj_1",
                "timeout": "5s",
                "discover": True,
                "discover_metadata": {"team": "ml"},
                "discover_endpoints": ["/v1/embeddings"],
                "track": ["batch_1"],
                "max_requests_per_second": 3,
                "max_concurrency": 2,
            },
            {
                "name": "azure-eu",
                "provider": "azure",
                "base_url": "https://eu.openai.azure.com/openai",
                "api_version": "2024-10-21",
            },
        ]
    }


def test_two_sources_each_with_their_own_keys() -> None:
    config = parse_config(two_sources())
    sources = config.named_sources()
    assert list(sources) == ["main", "azure-eu"]
    main, azure = sources["main"], sources["azure-eu"]
    assert isinstance(main, OpenAISourceConfig)
    assert (main.provider_name, main.source_name, main.base_url, main.api_key_env) == (
        "openai",
        "main",
        "https://api.groq.com/openai/v1",  # the trailing slash is dropped
        "GROQ_KEY",
    )
    assert (main.organization, main.project, main.timeout) == ("org-1", "proj_1", 5.0)
    assert (main.discover, main.discover_metadata, main.discover_endpoints, main.track) == (
        True,
        {"team": "ml"},
        ["/v1/embeddings"],
        ["batch_1"],
    )
    assert (main.max_requests_per_second, main.max_concurrency) == (3.0, 2)
    assert isinstance(azure, AzureSourceConfig)
    assert (azure.provider_name, azure.base_url, azure.api_version) == (
        "azure",
        "https://eu.openai.azure.com/openai",
        "2024-10-21",
    )
    assert azure.api_key_env == "AZURE_OPENAI_API_KEY"  # each provider's own default
    assert (azure.max_requests_per_second, azure.max_concurrency, azure.discover) == (None, None, False)
    assert config.source is None


def test_each_source_reads_its_own_key() -> None:
    config = parse_config(two_sources())
    with pytest.raises(ConfigError) as info:
        config.check_secrets({"GROQ_KEY": "gsk-1"})
    assert info.value.key == "sources.azure-eu.api_key_env"
    assert "AZURE_OPENAI_API_KEY" in info.value.render()
    config.check_secrets({"GROQ_KEY": "gsk-1", "AZURE_OPENAI_API_KEY": "az-1"})
    config.check_secrets({}, sources=False)
    sources = config.named_sources()
    assert sources["main"].api_key({"GROQ_KEY": "gsk-1", "OPENAI_API_KEY": "other"}) == "gsk-1"


def test_discovery_filters_are_per_source() -> None:
    sources = parse_config(two_sources()).named_sources()
    assert sources["main"].wants({"team": "ml", "x": "y"}, "/v1/embeddings")
    assert not sources["main"].wants({"team": "ml"}, "/v1/chat/completions")
    assert not sources["main"].wants({"team": "ops"}, "/v1/embeddings")
    assert not sources["main"].wants(None, "/v1/embeddings")
    assert sources["azure-eu"].wants(None, None)


def test_without_sources_there_is_one_openai_source() -> None:
    [(name, source)] = parse_config({}).named_sources().items()
    assert name == "openai"
    assert isinstance(source, OpenAISourceConfig)
    assert source.base_url == "https://api.openai.com/v1"


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        pytest.param(
            {
                "sources": [
                    {"name": "a", "provider": "openai"},
                    {"name": "a", "provider": "azure", "base_url": "https://x"},
                ]
            },
            "a",
            id="same-name",
        ),
        pytest.param({"sources": [{"provider": "openai"}, {"provider": "openai"}]}, "openai", id="same-default"),
        pytest.param({"source": {}, "sources": [{"provider": "openai"}]}, "openai", id="legacy-and-list"),
        pytest.param(
            {"sources": [{"provider": "openai"}, {"name": "openai", "provider": "openai"}]},
            "openai",
            id="named-as-a-default",
        ),
    ],
)
def test_source_names_must_be_unique(raw: dict[str, Any], name: str) -> None:
    error = config_error(raw)
    assert error.key == f"sources[{name}].name"
    assert repr(name) in error.problem
    assert "distinct name" in error.fix


def test_sources_of_different_providers_need_no_names() -> None:
    config = parse_config({"sources": [{"provider": "openai"}, {"provider": "azure", "base_url": "https://x"}]})
    assert list(config.named_sources()) == ["openai", "azure"]


@pytest.mark.parametrize(
    ("source", "key", "problem"),
    [
        pytest.param({"name": "a", "provider": "bedrock"}, "sources[a]", "unknown provider", id="unknown-provider"),
        pytest.param({"name": "a", "provider": "azure"}, "sources[a].base_url", "missing", id="azure-needs-base-url"),
        pytest.param(
            {"name": "a", "provider": "openai", "api_version": "2024-10-21"},
            "sources[a].api_version",
            "unknown key",
            id="api-version-is-azure-only",
        ),
        pytest.param(
            {"name": "a", "provider": "azure", "base_url": "https://x", "organization": "org-1"},
            "sources[a].organization",
            "unknown key",
            id="organization-is-openai-only",
        ),
        pytest.param({"name": "a", "base_url": "ftp://x"}, "sources[a].base_url", "http", id="bad-base-url"),
        pytest.param({"name": "a", "max_concurrency": 0}, "sources[a].max_concurrency", "", id="zero-concurrency"),
        pytest.param(
            {"name": "a", "max_requests_per_second": 0}, "sources[a].max_requests_per_second", "", id="zero-rate"
        ),
        pytest.param({"name": "a b"}, "sources[a b].name", "pattern", id="name-with-a-space"),
        pytest.param({"name": "a", "bogus": 1}, "sources[a].bogus", "unknown key", id="unknown-key"),
    ],
)
def test_source_problems_name_the_key(source: dict[str, Any], key: str, problem: str) -> None:
    error = config_error({"sources": [source]})
    assert error.key == key
    assert problem in error.problem
    assert error.fix


def test_unknown_provider_lists_the_providers() -> None:
    error = config_error({"sources": [{"name": "a", "provider": "bedrock"}]})
    for provider in ("openai", "azure"):
        assert provider in error.fix


def test_the_legacy_source_table_is_one_source() -> None:
    config = parse_config({"source": {"base_url": "https://llm.internal/v1", "api_key_env": "K", "track": ["b1"]}})
    [(name, source)] = config.named_sources().items()
    assert name == "openai"
    assert isinstance(source, OpenAISourceConfig)
    assert (source.base_url, source.api_key_env, source.track) == ("https://llm.internal/v1", "K", ["b1"])
    assert config.source == source


def test_the_legacy_source_kind_picks_the_provider() -> None:
    config = parse_config({"source": {"kind": "azure", "base_url": "https://r.openai.azure.com/openai", "name": "az"}})
    [(name, source)] = config.named_sources().items()
    assert name == "az"
    assert isinstance(source, AzureSourceConfig)
    assert source.api_key_env == "AZURE_OPENAI_API_KEY"


def test_the_legacy_source_comes_first_beside_sources() -> None:
    config = parse_config({"source": {"name": "old"}, "sources": [{"name": "new", "provider": "openai"}]})
    assert list(config.named_sources()) == ["old", "new"]


def test_the_legacy_source_keeps_its_error_keys() -> None:
    assert config_error({"source": {"base_url": "ftp://x"}}).key == "source.base_url"
    error = config_error({"source": {"kind": "bedrock"}})
    assert (error.key, error.problem) == ("source", "unknown provider")


# -- sinks -------------------------------------------------------------------------------------------


def test_sink_default_names_are_the_kind_then_numbered() -> None:
    config = parse_config(
        {
            "sinks": [
                {"kind": "stdout"},
                {"kind": "file", "path": "/tmp/a"},
                {"kind": "file", "path": "/tmp/b"},
                {"kind": "webhook", "name": "alerts", "url": "https://x"},
                {"kind": "file", "path": "/tmp/c"},
                {"kind": "webhook", "url": "https://y"},
                {"kind": "mqtt"},
            ]
        }
    )
    assert list(config.named_sinks()) == ["stdout", "file", "file-2", "alerts", "file-3", "webhook-2", "mqtt"]
    assert [s.kind for s in config.named_sinks().values()] == [s.kind for s in config.sinks]


def test_a_name_may_not_repeat_a_default_name() -> None:
    error = config_error({"sinks": [{"kind": "stdout"}, {"kind": "file", "name": "stdout", "path": "/tmp/a"}]})
    assert error.key == "sinks[stdout].name"
    assert "'stdout'" in error.problem


def test_secret_errors_use_the_default_sink_name() -> None:
    config = parse_config(
        {
            "sinks": [
                {"kind": "webhook", "url": "https://x"},
                {"kind": "webhook", "url": "https://y", "secret_env": "SECOND_SECRET"},
            ]
        }
    )
    with pytest.raises(ConfigError) as info:
        config.check_secrets({}, sources=False)
    assert info.value.key == "sinks.webhook-2.secret_env"


def mqtt_error(**fields: Any) -> ConfigError:
    return config_error({"sinks": [{"kind": "mqtt", "name": "m", **fields}]})


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        pytest.param("http://broker:1883", "mqtt://", id="scheme"),
        pytest.param("mqtt://:1883", "no host", id="no-host"),
        pytest.param("mqtt://broker:99999", "port", id="port-out-of-range"),
        pytest.param("mqtt://broker:abc", "port", id="port-not-a-number"),
        pytest.param("mqtt://user:hunter2@broker:1883", "credentials", id="credentials"),
    ],
)
def test_mqtt_urls_are_checked_by_the_config_model(url: str, problem: str) -> None:
    error = mqtt_error(url=url)
    assert error.key == "sinks[m].url"
    assert problem in error.problem
    assert "hunter2" not in error.render()
    # The model itself refuses it: no sink has to be built for the check.
    with pytest.raises(pydantic.ValidationError):
        MqttSinkConfig(kind="mqtt", url=url)


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker", "broker", 1883, False),
        ("mqtts://broker", "broker", 8883, True),
        ("mqtts://broker:18883", "broker", 18883, True),
        ("mqtt://[::1]:1884", "::1", 1884, False),
    ],
)
def test_mqtt_url_parts(url: str, host: str, port: int, tls: bool) -> None:
    sink = MqttSinkConfig(kind="mqtt", url=url)
    assert (sink.host, sink.port, sink.tls) == (host, port, tls)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        pytest.param({"url": "mqtt://broker", "ca_file": "/etc/ca.pem"}, "mqtts://", id="tls-option-on-plain-url"),
        pytest.param({"url": "mqtt://broker", "tls_insecure": True}, "mqtts://", id="insecure-on-plain-url"),
        pytest.param({"url": "mqtts://broker", "cert_file": "/etc/c.pem"}, "key_file", id="cert-without-key"),
        pytest.param({"topic_prefix": "a/#"}, "wildcard", id="wildcard-prefix"),
        pytest.param({"topic_prefix": "a/"}, "'/'", id="trailing-slash-prefix"),
        pytest.param({"password_env": "A", "password_file": "/run/p"}, "only one", id="two-password-forms"),
    ],
)
def test_mqtt_settings_are_checked_by_the_config_model(fields: dict[str, Any], problem: str) -> None:
    error = mqtt_error(**fields)
    assert error.key.startswith("sinks[m]")
    assert problem in error.problem


@pytest.mark.parametrize(
    "header",
    ["webhook-id", "Webhook-Timestamp", "Webhook-Signature", "Content-Type", "content-length", "Host"],
)
def test_webhook_headers_may_not_replace_reserved_ones(header: str) -> None:
    error = config_error(
        {"sinks": [{"kind": "webhook", "name": "hook", "url": "https://x", "headers": {header: "forged-value"}}]}
    )
    assert error.key == "sinks[hook].headers"
    assert header in error.problem
    assert "forged-value" not in error.render()


def test_webhook_other_headers_are_fine() -> None:
    config = parse_config(
        {"sinks": [{"kind": "webhook", "url": "https://x", "headers": {"Authorization": "Bearer t", "X-Team": "ml"}}]}
    )
    sink = config.named_sinks()["webhook"]
    assert isinstance(sink, WebhookSinkConfig)
    assert sink.headers == {"Authorization": "Bearer t", "X-Team": "ml"}


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("whsec_?!not-base64", id="not-base64"),
        pytest.param("sk-live-not-a-webhook-secret", id="no-prefix"),
        pytest.param("whsec_", id="empty-key"),
    ],
)
def test_webhook_secrets_are_checked_with_the_config(secret: str) -> None:
    config = parse_config({"sinks": [{"kind": "webhook", "name": "hook", "url": "https://x", "secret_env": "WH"}]})
    with pytest.raises(ConfigError) as info:
        config.check_secrets({"WH": secret}, sources=False)
    assert info.value.key == "sinks.hook.secret"
    if secret != "whsec_":
        assert secret not in info.value.render()
    assert "whsec_" in info.value.fix
    config.check_secrets({"WH": "whsec_" + "QUJDREVGR0hJSktMTU5PUA=="}, sources=False)


def test_webhook_secrets_rotate_newest_first(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("whsec_b2xkLXNlY3JldA==\n", encoding="utf-8")
    sink = WebhookSinkConfig(kind="webhook", url="https://x", secret_env=["NEW"])
    assert webhook_secrets(sink, "sinks.hook", {"NEW": "whsec_bmV3LXNlY3JldA=="}) == ["whsec_bmV3LXNlY3JldA=="]
    both = WebhookSinkConfig(kind="webhook", url="https://x", secret_file=[tmp_path / "old"])
    assert webhook_secrets(both, "sinks.hook", {}) == ["whsec_b2xkLXNlY3JldA=="]
    assert webhook_secrets(WebhookSinkConfig(kind="webhook", url="https://x"), "sinks.hook", {}) == []


def test_webhook_secret_forms_and_pagerduty_key_are_checked() -> None:
    both = config_error({"sinks": [{"kind": "webhook", "url": "https://x", "secret_env": "A", "secret_file": "/b"}]})
    assert "only one of secret_env and secret_file" in both.problem
    pagerduty = config_error({"sinks": [{"kind": "webhook", "url": "https://x", "format": "pagerduty"}]})
    assert "routing_key" in pagerduty.problem


# -- state -------------------------------------------------------------------------------------------


def state(path: Path) -> StateConfig:
    return parse_config({"state": {"path": str(path)}}).state


def test_a_usable_state_path_is_returned_and_nothing_is_created(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "state.db"
    assert state(path).check_usable({}) == path
    assert not (tmp_path / "not").exists()
    existing = tmp_path / "state.db"
    existing.write_bytes(b"")
    assert state(existing).check_usable({}) == existing


@pytest.mark.parametrize(
    ("layout", "problem"),
    [
        pytest.param("plain/state.db", "not a directory", id="parent-is-a-file"),
        pytest.param("plain/sub/dir/state.db", "not a directory", id="directory-cannot-be-created"),
        pytest.param("folder", "is a directory", id="path-is-a-directory"),
    ],
)
def test_an_unusable_state_path_is_a_config_error(tmp_path: Path, layout: str, problem: str) -> None:
    (tmp_path / "plain").write_text("a file, not a directory")
    (tmp_path / "folder").mkdir()
    path = tmp_path / layout
    with pytest.raises(ConfigError) as info:
        state(path).check_usable({})
    assert info.value.key == "state.path"
    assert str(path) in info.value.problem
    assert problem in info.value.problem
    assert info.value.fix


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_state_directory_without_write_permission_is_a_config_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as info:
            state(locked / "sub" / "state.db").check_usable({})
        assert info.value.key == "state.path"
        assert "not writable" in info.value.problem
    finally:
        locked.chmod(0o700)


def test_the_state_path_defaults(tmp_path: Path) -> None:
    default = StateConfig()
    assert default.db_path({"STATE_DIRECTORY": f"{tmp_path}/a:{tmp_path}/b"}) == tmp_path / "a" / "state.db"
    assert default.db_path({}).parts[-2:] == ("batch-poller", "state.db")
    assert state(tmp_path / "x.db").db_path({"STATE_DIRECTORY": "/elsewhere"}) == tmp_path / "x.db"


# -- service -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:65536", "127.0.0.1:99999", "localhost:1000000"])
def test_a_listen_port_outside_the_range_is_a_config_error(listen: str) -> None:
    error = config_error({"service": {"listen": listen}})
    assert error.key == "service.listen"
    assert "1 to 65535" in error.problem
    assert error.value == listen
    with pytest.raises(pydantic.ValidationError):
        ServiceConfig(listen=listen)


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:", ":9464", "localhost:http", "127.0.0.1:-1"])
def test_a_listen_address_without_host_and_port_is_a_config_error(listen: str) -> None:
    error = config_error({"service": {"listen": listen}})
    assert error.key == "service.listen"
    assert "HOST:PORT" in error.problem


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
        ("127.0.0.1:0", "127.0.0.1", 0),  # 0 picks a free port (tests use it)
        ("[::1]:9464", "::1", 9464),
        ("localhost:9464", "localhost", 9464),
    ],
)
def test_listen_addresses_accepted(listen: str, host: str, port: int) -> None:
    service = parse_config({"service": {"listen": listen}}).service
    assert (service.host, service.port, service.is_loopback) == (host, port, True)


def test_listening_beyond_loopback_needs_a_token() -> None:
    error = config_error({"service": {"listen": "0.0.0.0:9464"}})
    assert error.key.startswith("service")
    assert "token_env" in error.problem
    guarded = parse_config({"service": {"listen": "0.0.0.0:9464", "token_env": "TOKEN"}}).service
    assert (guarded.is_loopback, guarded.has_token) == (False, True)
    assert parse_config({"service": {"listen": "0.0.0.0:9464", "enabled": False}}).service.enabled is False


# -- secrets -----------------------------------------------------------------------------------------


def test_missing_secret_env_names_the_key_and_leaks_nothing() -> None:
    config = parse_config({"source": {"api_key_env": "MY_OPENAI_KEY"}})
    environ = {"OPENAI_API_KEY": LEAKY, "OTHER_SECRET": LEAKY + "-2", "PATH": "/usr/bin"}
    with pytest.raises(ConfigError) as info:
        config.check_secrets(environ)
    error = info.value
    assert error.key == "sources.openai.api_key_env"
    assert "MY_OPENAI_KEY" in error.render()
    for text in (str(error), error.render(), error.problem, error.fix, repr(error.value)):
        assert LEAKY not in text


def test_default_secret_env_is_openai_api_key() -> None:
    config = parse_config({})
    [source] = config.named_sources().values()
    with pytest.raises(ConfigError) as info:
        source.api_key({})
    assert info.value.key == "sources.openai.api_key_env"
    assert "OPENAI_API_KEY" in info.value.render()
    assert source.api_key({"OPENAI_API_KEY": " sk-test \n"}) == "sk-test"


def test_secret_file_relative_to_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "openai").write_text("sk-from-file\n", encoding="utf-8")
    config = parse_config({"source": {"api_key_file": "openai"}})
    assert config.named_sources()["openai"].api_key({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "sk-from-file"


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
def test_config_errors_never_echo_credentials_in_urls_or_headers(sink: dict[str, Any], secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sinks": [sink]})
    assert secret not in info.value.render()
