"""`[[sources]]`: where batches come from. One model per provider, told apart by `provider`.

A single `[source]` table (the 0.1 form, with `kind` for the provider) is still read as one source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

from poller.config.base import NAME_PATTERN, Section
from poller.config.secrets import read_secret, secret_pair_check
from poller.durations import Duration


class SourceBase(Section):
    """Keys every source has, whatever its provider."""

    #: The `source` of events, the middle of MQTT topics; default: the provider's name.
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    base_url: str
    api_key_env: str | None = None
    api_key_file: Path | None = None
    timeout: Duration = 30.0
    discover: bool = False
    discover_metadata: dict[str, str] = Field(default_factory=dict)
    discover_endpoints: list[str] = Field(default_factory=list)
    track: list[str] = Field(default_factory=list)
    #: This key's own request budget; default `[poll] max_requests_per_second` (rate limits are per key).
    max_requests_per_second: float | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, ge=1, le=256)

    #: The environment variable read for the key when neither api_key_env nor api_key_file is set.
    DEFAULT_KEY_ENV: ClassVar[str] = ""

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _key_default(self) -> Self:
        if self.api_key_env is None and self.api_key_file is None:
            object.__setattr__(self, "api_key_env", self.DEFAULT_KEY_ENV)
        secret_pair_check(self, "api_key", required=True)
        return self

    @property
    def provider_name(self) -> str:
        return str(getattr(self, "provider", "?"))

    @property
    def source_name(self) -> str:
        return self.name or self.provider_name

    def api_key(self, environ: dict[str, str] | None = None) -> str:
        return read_secret(f"sources.{self.source_name}.api_key", self.api_key_env, self.api_key_file, environ)

    def wants(self, metadata: dict[str, str] | None, endpoint: str | None) -> bool:
        """Whether discovery adopts a batch with this metadata and endpoint."""
        meta = metadata or {}
        if any(meta.get(k) != v for k, v in self.discover_metadata.items()):
            return False
        return not self.discover_endpoints or endpoint in self.discover_endpoints


class OpenAISourceConfig(SourceBase):
    """OpenAI, and the compatible APIs (Groq, the LiteLLM proxy, Llama Stack): Bearer auth."""

    provider: Literal["openai"] = "openai"
    base_url: str = "https://api.openai.com/v1"
    DEFAULT_KEY_ENV: ClassVar[str] = "OPENAI_API_KEY"
    organization: str | None = None
    project: str | None = None


class AzureSourceConfig(SourceBase):
    """Azure OpenAI: the key in `api-key`; `api_version` for the classic API, none for the v1 API."""

    provider: Literal["azure"]
    DEFAULT_KEY_ENV: ClassVar[str] = "AZURE_OPENAI_API_KEY"
    api_version: str | None = None


class MistralSourceConfig(SourceBase):
    """Mistral batch jobs: Bearer auth; `base_url` is the SDK's `server_url` (paths add `/v1`)."""

    provider: Literal["mistral"]
    base_url: str = "https://api.mistral.ai"
    DEFAULT_KEY_ENV: ClassVar[str] = "MISTRAL_API_KEY"


class TogetherSourceConfig(SourceBase):
    """Together batches: Bearer auth; `base_url` is the SDK's `base_url` (paths add `/v1`)."""

    provider: Literal["together"]
    base_url: str = "https://api.together.ai"
    DEFAULT_KEY_ENV: ClassVar[str] = "TOGETHER_API_KEY"


class OpenRouterSourceConfig(SourceBase):
    """OpenRouter batches: Bearer auth; `base_url` is the SDK's `server_url`."""

    provider: Literal["openrouter"]
    base_url: str = "https://openrouter.ai/api/v1"
    DEFAULT_KEY_ENV: ClassVar[str] = "OPENROUTER_API_KEY"


class AnthropicSourceConfig(SourceBase):
    """Anthropic Message Batches: the key as the SDK sends it; `base_url` is the SDK's (paths add `/v1`)."""

    provider: Literal["anthropic"]
    base_url: str = "https://api.anthropic.com"
    DEFAULT_KEY_ENV: ClassVar[str] = "ANTHROPIC_API_KEY"
    #: The `anthropic-version` header; default what the `anthropic` SDK sends.
    anthropic_version: str = Field(default="2026-10-21", min_length=1)
    #: `anthropic-workspace-id`, for a key that can act on more than one workspace.
    workspace_id: str | None = None


class GeminiSourceConfig(SourceBase):
    """Gemini API batch mode: the key in `x-goog-api-key`; `base_url` and `api_version` as the SDK's HttpOptions."""

    provider: Literal["gemini"]
    base_url: str = "https://generativelanguage.googleapis.com"
    DEFAULT_KEY_ENV: ClassVar[str] = "GEMINI_API_KEY"
    #: Batch mode is served under `v1beta`.
    api_version: str = Field(default="v1beta", pattern=r"^v[0-9]+[a-z0-9]*$")


SourceConfig = Annotated[
    OpenAISourceConfig
    | AzureSourceConfig
    | MistralSourceConfig
    | TogetherSourceConfig
    | OpenRouterSourceConfig
    | AnthropicSourceConfig
    | GeminiSourceConfig,
    Field(discriminator="provider"),
]
PROVIDERS: tuple[str, ...] = ("openai", "azure", "mistral", "together", "openrouter", "anthropic", "gemini")


def legacy_source(table: dict[str, Any]) -> dict[str, Any]:
    """A 0.1 `[source]` table as one `[[sources]]` entry (`kind` was the provider)."""
    entry = dict(table)
    if "kind" in entry and "provider" not in entry:
        entry["provider"] = entry.pop("kind")
    entry.setdefault("provider", "openai")
    return entry
