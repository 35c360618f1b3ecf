"""The whole configuration: TOML file, overridden by ``BATCH_POLLER_…`` environment variables."""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from poller.config.secrets import read_secret
from poller.config.settings import LogConfig, PollConfig, ServiceConfig, StateConfig
from poller.config.sinks import SinkConfig, sink_names, sink_secrets
from poller.config.sources import OpenAISourceConfig, SourceConfig, legacy_source
from poller.errors import ConfigError

ENV_PREFIX = "BATCH_POLLER_"


class Config(BaseSettings):
    """The whole configuration. Build it with `load_config`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    #: The 0.1 form: one `[source]` table (its `kind` is the provider). `[[sources]]` may hold more.
    source: SourceConfig | None = None
    sources: list[SourceConfig] = Field(default_factory=list)
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

    @model_validator(mode="before")
    @classmethod
    def _legacy_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("source"), dict):
            data = dict(data) | {"source": legacy_source(data["source"])}
        if isinstance(data, dict) and isinstance(data.get("sources"), list):
            # `provider` may be left out, as in `[source]`: OpenAI (and the compatible APIs).
            entries = [{"provider": "openai"} | e if isinstance(e, dict) else e for e in data["sources"]]
            data = dict(data) | {"sources": entries}
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        # A ConfigError (not a ValueError, which pydantic would file under the top level) names the key.
        for section, names in (("sinks", sink_names(self.sinks)), ("sources", self._source_names())):
            for name in names:
                if names.count(name) > 1:
                    raise ConfigError(
                        f"{section}[{name}].name",
                        f"two {section} are named {name!r}",
                        f"give each [[{section}]] a distinct name",
                    )
        return self

    def _source_names(self) -> list[str]:
        return [s.source_name for s in self._source_list()]

    def _source_list(self) -> list[SourceConfig]:
        listed = ([self.source] if self.source is not None else []) + list(self.sources)
        return listed or [OpenAISourceConfig()]

    def named_sources(self) -> dict[str, SourceConfig]:
        """Every source by name, in config order (an OpenAI source when none is configured)."""
        return {s.source_name: s for s in self._source_list()}

    def named_sinks(self) -> dict[str, SinkConfig]:
        return dict(zip(sink_names(self.sinks), self.sinks, strict=True))

    def check_secrets(
        self,
        environ: dict[str, str] | None = None,
        *,
        sources: bool = True,
        sinks: bool = True,
        service: bool = True,
    ) -> None:
        """Read the configured secrets a command uses once, so a missing one fails at start, not at first use."""
        if sources:
            for source in self.named_sources().values():
                source.api_key(environ)
        if service and self.service.has_token:
            read_secret("service.token", self.service.token_env, self.service.token_file, environ)
        if sinks:
            for name, sink in self.named_sinks().items():
                sink_secrets(name, sink, environ)
