"""`[[sinks]]`: where events go. One model per kind, told apart by `kind`; every check of a sink's
settings lives here (the sinks themselves only build connections).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from poller import signing
from poller.config.base import NAME_PATTERN, KeyValueError, Section
from poller.config.secrets import read_secret, secret_pair_check
from poller.durations import Duration
from poller.errors import ConfigError

#: Headers a webhook sets itself; `headers` may not override them.
RESERVED_HEADERS = frozenset(
    {signing.ID_HEADER, signing.TIMESTAMP_HEADER, signing.SIGNATURE_HEADER, "content-type", "content-length", "host"}
)


class SinkBase(Section):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    events: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    sources: list[str] = Field(default_factory=list)
    max_in_flight: int = Field(default=16, ge=1, le=1024)

    def wants(self, event_type: str, batch_metadata: dict[str, str] | None, source: str | None = None) -> bool:
        """Whether this sink subscribes to an event: type filter, source filter and metadata match."""
        if self.events and event_type not in self.events:
            return False
        if self.sources and source not in self.sources:
            return False
        meta = batch_metadata or {}
        return all(meta.get(k) == v for k, v in self.metadata.items())


class StdoutSinkConfig(SinkBase):
    kind: Literal["stdout"]
    #: json: one event per line (for pipes); text: one readable line per event (for people).
    format: Literal["json", "text"] = "json"


class FileSinkConfig(SinkBase):
    kind: Literal["file"]
    path: Path


class MqttSinkConfig(SinkBase):
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
    homeassistant: bool = False
    homeassistant_prefix: str = "homeassistant"
    homeassistant_batches: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("mqtt://", "mqtts://")):
            raise ValueError("url must be mqtt://host:port or mqtts://host:port")
        parts = urlsplit(value)
        if "@" in value.split("://", 1)[1]:
            raise ValueError("put no credentials in url: use username and password_env / password_file")
        try:
            parts.port  # noqa: B018 - parsing is the check
        except ValueError:
            raise ValueError("the port is not a number from 0 to 65535 (mqtt://host:1883)") from None
        if not parts.hostname:
            raise ValueError("url has no host (mqtt://host:1883 or mqtts://host:8883)")
        return value

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: object) -> object:
        return str(value) if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _check(self) -> Self:
        secret_pair_check(self, "password", required=False)
        tls_options = self.ca_file or self.cert_file or self.tls_insecure
        if tls_options and not self.tls:
            raise ValueError("ca_file, cert_file and tls_insecure need an mqtts:// url (TLS is never implied)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file for a client certificate, or neither")
        if self.topic_prefix.endswith("/") or any(c in self.topic_prefix for c in "+#"):
            raise ValueError("topic_prefix must not end with '/' or contain MQTT wildcards")
        ha_prefix = self.homeassistant_prefix
        if not ha_prefix or ha_prefix.endswith("/") or any(c in ha_prefix for c in "+#"):
            raise ValueError("homeassistant_prefix must be non-empty, not end with '/' nor contain MQTT wildcards")
        if self.homeassistant_batches and not self.homeassistant:
            raise ValueError("homeassistant_batches needs homeassistant = true")
        return self

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        return port if port is not None else (8883 if self.tls else 1883)


def _default_retry_schedule() -> list[float]:
    return [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]


class WebhookSinkConfig(SinkBase):
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

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(h for h in value if h.lower() in RESERVED_HEADERS)
        if reserved:
            raise ValueError(f"{', '.join(reserved)} is set by batch-poller itself: remove it from headers")
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.secret_env is not None and self.secret_file is not None:
            raise ValueError("set only one of secret_env and secret_file")
        secret_pair_check(self, "routing_key", required=False)
        if self.format == "pagerduty" and self.routing_key_env is None and self.routing_key_file is None:
            raise ValueError("format 'pagerduty' needs routing_key_env or routing_key_file")
        return self


#: Keys an apprise sink refuses: its URLs hold tokens, so they never sit in the config file itself.
_INLINE_URL_KEYS = ("urls", "url")


class AppriseSinkConfig(SinkBase):
    kind: Literal["apprise"]
    urls_env: str | None = None
    urls_file: Path | None = None
    timeout: Duration = 30.0
    max_concurrency: int = Field(default=4, ge=1, le=64)
    retry_schedule: list[Duration] = Field(default_factory=_default_retry_schedule)
    links: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline_urls(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in _INLINE_URL_KEYS:
                if key in data:
                    raise KeyValueError(
                        key,
                        "inline Apprise URLs are refused: they hold tokens, so they never go in the config file",
                        f'remove {key}; put the URLs in an environment variable and set urls_env = "NAME", '
                        'or in a file (one URL a line) and set urls_file = "path"',
                    )
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        secret_pair_check(self, "urls", required=True)
        return self


SinkConfig = Annotated[
    StdoutSinkConfig | FileSinkConfig | MqttSinkConfig | WebhookSinkConfig | AppriseSinkConfig,
    Field(discriminator="kind"),
]
SINK_KINDS: tuple[str, ...] = ("stdout", "file", "mqtt", "webhook", "apprise")


def webhook_secrets(sink: WebhookSinkConfig, key: str, environ: dict[str, str] | None = None) -> list[str]:
    """The signing secrets of a webhook sink, newest first, each checked; empty when it signs nothing."""
    envs = [sink.secret_env] if isinstance(sink.secret_env, str) else list(sink.secret_env or [])
    files = [sink.secret_file] if isinstance(sink.secret_file, Path) else list(sink.secret_file or [])
    secrets = [read_secret(f"{key}.secret", env, None, environ) for env in envs]
    secrets += [read_secret(f"{key}.secret", None, file, environ) for file in files]
    for secret in secrets:
        try:
            signing.secret_key(secret)
        except ValueError as exc:
            raise ConfigError(f"{key}.secret", str(exc), "use the whsec_… value exactly as issued") from None
    return secrets


def sink_secrets(name: str, sink: SinkConfig, environ: dict[str, str] | None = None) -> None:
    """Read every secret one sink needs, so a missing one fails before anything starts."""
    key = f"sinks.{name}"
    if isinstance(sink, MqttSinkConfig) and (sink.password_env or sink.password_file):
        read_secret(f"{key}.password", sink.password_env, sink.password_file, environ)
    if isinstance(sink, WebhookSinkConfig):
        webhook_secrets(sink, key, environ)
        if sink.routing_key_env or sink.routing_key_file:
            read_secret(f"{key}.routing_key", sink.routing_key_env, sink.routing_key_file, environ)
    if isinstance(sink, AppriseSinkConfig):
        read_secret(f"{key}.urls", sink.urls_env, sink.urls_file, environ)


def sink_names(sinks: list[SinkConfig]) -> list[str]:
    """Each sink's name: its `name`, else its kind for the first of that kind, `kind-2` for the second..."""
    names: list[str] = []
    counts: dict[str, int] = {}
    for sink in sinks:
        counts[sink.kind] = counts.get(sink.kind, 0) + 1
        n = counts[sink.kind]
        names.append(sink.name or (sink.kind if n == 1 else f"{sink.kind}-{n}"))
    return names
