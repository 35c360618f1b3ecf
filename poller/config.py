"""Configuration: TOML file, overridden by ``BATCH_POLLER_…`` environment variables, validated up front.

Every problem is reported as a `ConfigError` naming the key, the value and the fix. Secrets are never
values in the config, only references (``*_env`` names an environment variable, ``*_file`` a file;
a relative file is looked up in ``$CREDENTIALS_DIRECTORY`` when systemd sets it).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from poller.durations import Duration
from poller.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/batch-poller/config.toml")
ENV_PREFIX = "BATCH_POLLER_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def read_secret(key: str, env: str | None, file: Path | None, environ: dict[str, str] | None = None) -> str:
    """The secret named by an ``*_env``/``*_file`` pair; raises ConfigError (without the value) if absent."""
    environ = dict(os.environ) if environ is None else environ
    if file is not None:
        path = file
        if not path.is_absolute() and environ.get("CREDENTIALS_DIRECTORY"):
            path = Path(environ["CREDENTIALS_DIRECTORY"]) / path
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{key}_file",
                f"cannot read the secret file {str(path)!r}: {exc.strerror}",
                "point it at a readable file (with systemd, LoadCredential= and a name relative to "
                "$CREDENTIALS_DIRECTORY)",
            ) from None
        if not value:
            raise ConfigError(f"{key}_file", f"the secret file {str(path)!r} is empty", "write the secret into it")
        return value
    if env is not None:
        value = environ.get(env, "").strip()
        if not value:
            raise ConfigError(
                f"{key}_env",
                f"the environment variable {env} is not set",
                f"export {env}=… or set {key}_file to a file holding the secret",
            )
        return value
    raise ConfigError(key, "no secret configured", f"set {key}_env or {key}_file")


def _secret_pair_check(section: BaseModel, key: str, *, required: bool) -> None:
    env = getattr(section, f"{key}_env")
    file = getattr(section, f"{key}_file")
    if env is not None and file is not None:
        raise ValueError(f"set only one of {key}_env and {key}_file")
    if required and env is None and file is None:
        raise ValueError(f"set {key}_env or {key}_file")


class SourceConfig(_Section):
    """Where batches come from."""

    kind: Literal["openai", "azure"] = "openai"
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = None
    api_key_file: Path | None = None
    organization: str | None = None
    project: str | None = None
    api_version: str | None = None
    timeout: Duration = 30.0
    discover: bool = False
    discover_metadata: dict[str, str] = Field(default_factory=dict)
    discover_endpoints: list[str] = Field(default_factory=list)
    track: list[str] = Field(default_factory=list)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _defaults(self) -> Self:
        if self.api_key_env is None and self.api_key_file is None:
            default = "AZURE_OPENAI_API_KEY" if self.kind == "azure" else "OPENAI_API_KEY"
            object.__setattr__(self, "api_key_env", default)
        _secret_pair_check(self, "api_key", required=True)
        return self

    @property
    def source_name(self) -> str:
        """The `source` field of events and the middle of MQTT topics."""
        return self.name or self.kind

    def api_key(self, environ: dict[str, str] | None = None) -> str:
        return read_secret("source.api_key", self.api_key_env, self.api_key_file, environ)


class PollConfig(_Section):
    validating: Duration = 10.0
    in_progress: Duration = 30.0
    finalizing: Duration = 10.0
    cancelling: Duration = 10.0
    growth: float = Field(default=1.5, ge=1.0, le=10.0)
    max_interval: Duration = 300.0
    error_backoff: Duration = 5.0
    max_error_backoff: Duration = 600.0
    auth_backoff: Duration = 60.0
    discover_interval: Duration = 60.0
    max_concurrency: int = Field(default=8, ge=1, le=256)
    max_requests_per_second: float = Field(default=10.0, gt=0)
    progress: bool = True
    progress_interval: Duration = 60.0
    stall_after: Duration = 1800.0
    expiry_warning: Duration = 3600.0
    gone_after: int = Field(default=3, ge=1)
    retention: Duration = 7 * 86400.0

    def base_intervals(self) -> dict[str, float]:
        """Base poll interval by status, for `poller.schedule.Intervals`."""
        return {s: getattr(self, s) for s in ("validating", "in_progress", "finalizing", "cancelling")}

    @model_validator(mode="after")
    def _positive(self) -> Self:
        for key in ("validating", "in_progress", "finalizing", "cancelling", "max_interval"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be longer than 0s")
        return self


class StateConfig(_Section):
    path: Path | None = None

    def db_path(self, environ: dict[str, str] | None = None) -> Path:
        environ = dict(os.environ) if environ is None else environ
        if self.path is not None:
            return self.path
        if environ.get("STATE_DIRECTORY"):
            # systemd may pass several directories separated by ':'; the first is ours.
            return Path(environ["STATE_DIRECTORY"].split(":")[0]) / "state.db"
        return Path(platformdirs.user_state_dir("batch-poller")) / "state.db"


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ServiceConfig(_Section):
    listen: str = "127.0.0.1:9464"
    enabled: bool = True
    token_env: str | None = None
    token_file: Path | None = None
    shutdown_timeout: Duration = 10.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        _secret_pair_check(self, "token", required=False)
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError("listen must be HOST:PORT, for example 127.0.0.1:9464")
        if self.enabled and not self.is_loopback and self.token_env is None and self.token_file is None:
            raise ValueError(
                f"listen {self.listen} is not a loopback address: set token_env or token_file so the control API "
                "requires a bearer token, or listen on 127.0.0.1"
            )
        return self

    @property
    def is_loopback(self) -> bool:
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class _SinkBase(_Section):
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    events: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    max_in_flight: int = Field(default=16, ge=1, le=1024)

    def wants(self, event_type: str, batch_metadata: dict[str, str] | None) -> bool:
        """Whether this sink subscribes to an event: type filter and metadata match."""
        if self.events and event_type not in self.events:
            return False
        meta = batch_metadata or {}
        return all(meta.get(k) == v for k, v in self.metadata.items())


class StdoutSinkConfig(_SinkBase):
    kind: Literal["stdout"]
    #: json: one event per line (for pipes); text: one readable line per event (for people).
    format: Literal["json", "text"] = "json"


class FileSinkConfig(_SinkBase):
    kind: Literal["file"]
    path: Path


class MqttSinkConfig(_SinkBase):
    kind: Literal["mqtt"]
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    client_id: str | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    qos: Literal[0, 1, 2] = 1
    topic_prefix: str = "batch-poller"
    format: Literal["openai", "cloudevents"] = "openai"
    message_expiry: Duration | None = None
    keepalive: int = Field(default=60, ge=5)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("mqtt://", "mqtts://")):
            raise ValueError("url must be mqtt://host:port or mqtts://host:port")
        if "@" in value.split("://", 1)[1]:
            raise ValueError("put no credentials in url: use username and password_env / password_file")
        return value

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: object) -> object:
        return str(value) if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _check(self) -> Self:
        _secret_pair_check(self, "password", required=False)
        tls_options = self.ca_file or self.cert_file or self.tls_insecure
        if tls_options and not self.url.startswith("mqtts://"):
            raise ValueError("ca_file, cert_file and tls_insecure need an mqtts:// url (TLS is never implied)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file for a client certificate, or neither")
        if self.topic_prefix.endswith("/") or any(c in self.topic_prefix for c in "+#"):
            raise ValueError("topic_prefix must not end with '/' or contain MQTT wildcards")
        return self


def _default_retry_schedule() -> list[float]:
    return [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]


class WebhookSinkConfig(_SinkBase):
    kind: Literal["webhook"]
    url: str
    secret_env: str | list[str] | None = None
    secret_file: Path | list[Path] | None = None
    routing_key_env: str | None = None
    routing_key_file: Path | None = None
    format: Literal["openai", "cloudevents", "slack", "pagerduty", "alertmanager"] = "openai"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: Duration = 15.0
    max_concurrency: int = Field(default=4, ge=1, le=256)
    retry_schedule: list[Duration] = Field(default_factory=_default_retry_schedule)
    links: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.secret_env is not None and self.secret_file is not None:
            raise ValueError("set only one of secret_env and secret_file")
        _secret_pair_check(self, "routing_key", required=False)
        if self.format == "pagerduty" and self.routing_key_env is None and self.routing_key_file is None:
            raise ValueError("format 'pagerduty' needs routing_key_env or routing_key_file")
        return self


SinkConfig = Annotated[
    StdoutSinkConfig | FileSinkConfig | MqttSinkConfig | WebhookSinkConfig, Field(discriminator="kind")
]


class Config(BaseSettings):
    """The whole configuration. Build it with `load_config`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    source: SourceConfig = Field(default_factory=SourceConfig)
    poll: PollConfig = Field(default_factory=PollConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    sinks: list[SinkConfig] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment variables override the TOML file, which arrives as init kwargs.
        del settings_cls, dotenv_settings, file_secret_settings
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _unique_sink_names(self) -> Self:
        seen: set[str] = set()
        for index, sink in enumerate(self.sinks):
            name = sink_name(sink, index)
            if name in seen:
                raise ValueError(f"two sinks are named {name!r}; give each [[sinks]] a distinct name")
            seen.add(name)
        return self

    def named_sinks(self) -> dict[str, SinkConfig]:
        return {sink_name(sink, i): sink for i, sink in enumerate(self.sinks)}

    def check_secrets(self, environ: dict[str, str] | None = None) -> None:
        """Read every configured secret once, so a missing one fails at start-up, not at first use."""
        self.source.api_key(environ)
        if self.service.token_env or self.service.token_file:
            read_secret("service.token", self.service.token_env, self.service.token_file, environ)
        for name, sink in self.named_sinks().items():
            key = f"sinks.{name}"
            if isinstance(sink, MqttSinkConfig) and (sink.password_env or sink.password_file):
                read_secret(f"{key}.password", sink.password_env, sink.password_file, environ)
            if isinstance(sink, WebhookSinkConfig):
                webhook_secrets(sink, key, environ)
                if sink.routing_key_env or sink.routing_key_file:
                    read_secret(f"{key}.routing_key", sink.routing_key_env, sink.routing_key_file, environ)


def webhook_secrets(sink: WebhookSinkConfig, key: str, environ: dict[str, str] | None = None) -> list[str]:
    """The signing secrets of a webhook sink, newest first; empty when it signs nothing."""
    envs = [sink.secret_env] if isinstance(sink.secret_env, str) else list(sink.secret_env or [])
    files = [sink.secret_file] if isinstance(sink.secret_file, Path) else list(sink.secret_file or [])
    secrets = [read_secret(f"{key}.secret", env, None, environ) for env in envs]
    secrets += [read_secret(f"{key}.secret", None, file, environ) for file in files]
    for secret in secrets:
        if not secret.startswith("whsec_"):
            raise ConfigError(f"{key}.secret", "a webhook secret must start with 'whsec_'", "use a whsec_… value")
    return secrets


def sink_name(sink: SinkConfig, index: int) -> str:
    if sink.name:
        return sink.name
    return sink.kind if index == 0 or sink.kind == "stdout" else f"{sink.kind}-{index}"


def find_config_path(explicit: Path | None, environ: dict[str, str] | None = None) -> Path | None:
    environ = dict(os.environ) if environ is None else environ
    if explicit is not None:
        return explicit
    if environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(environ[f"{ENV_PREFIX}CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _key_of(loc: tuple[int | str, ...], raw: dict[str, Any]) -> str:
    parts: list[str] = []
    node: Any = raw
    for i, item in enumerate(loc):
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
            parts[-1] += f"[{name or item}]" if parts else f"[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        if i > 0 and isinstance(loc[i - 1], int) and item in {"stdout", "file", "mqtt", "webhook"}:
            continue  # the discriminator tag pydantic puts into the location
        parts.append(item)
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


_SECRETISH = ("key", "secret", "password", "token")


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "[redacted]"
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}/…" if "/" in rest or "@" in rest else f"{scheme}://{host}"


def _from_validation(exc: ValidationError, raw: dict[str, Any]) -> ConfigError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    key = _key_of(tuple(first["loc"]), raw)
    value = first.get("input")
    leaf = key.rsplit(".", 1)[-1]
    secretish = any(word in leaf.lower() for word in _SECRETISH) or ".headers" in f".{key}"
    if isinstance(value, dict | list) or secretish:
        value = None  # never echo whole sections, nor anything that may be a secret
    elif leaf == "url" and isinstance(value, str):
        value = _redact_url(value)  # a webhook URL's path (Slack) and userinfo are credentials
    kind = first["type"]
    if kind == "extra_forbidden":
        fix = "remove it or correct its spelling; config/config.example.toml lists every key"
        problem = "unknown key"
    elif kind == "missing":
        fix = "add it"
        problem = "required key is missing"
    elif kind == "union_tag_invalid":
        fix = "kind must be one of: stdout, file, mqtt, webhook"
        problem = "unknown sink kind"
    else:
        problem = first["msg"].removeprefix("Value error, ")
        fix = "see config/config.example.toml for the accepted values"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ConfigError(key, problem + more, fix, value)


def parse_config(raw: dict[str, Any]) -> Config:
    """A validated Config from a TOML-shaped dict plus the environment; raises ConfigError."""
    try:
        return Config(**raw)
    except ValidationError as exc:
        raise _from_validation(exc, raw) from None


def load_config(path: Path | None, *, require_file: bool = False) -> Config:
    """Read, merge and validate the configuration; raises ConfigError for every problem."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}", "pass the path of an existing TOML file") from None
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}", "check its permissions") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}", "fix the syntax at that line") from None
    elif require_file:
        raise ConfigError("--config", "no config file found", f"pass --config PATH or create {DEFAULT_CONFIG_PATH}")
    return parse_config(raw)
