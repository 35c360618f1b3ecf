"""Provider adapters: one module per provider's Batch API, all behind `poller.providers.base.Provider`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from poller.config.sources import SourceConfig
from poller.domain.schedule import Pacer
from poller.metrics import SourceMetrics
from poller.providers.base import Capabilities, Page, Provider


def _openai(config: Any, key: str, metrics: SourceMetrics, pacer: Pacer, concurrency: int) -> Provider:
    from poller.providers.openai import OpenAIProvider  # noqa: PLC0415

    return OpenAIProvider(config, key, metrics=metrics, pacer=pacer, max_concurrency=concurrency)


def _azure(config: Any, key: str, metrics: SourceMetrics, pacer: Pacer, concurrency: int) -> Provider:
    from poller.providers.openai import AzureProvider  # noqa: PLC0415

    return AzureProvider(config, key, metrics=metrics, pacer=pacer, max_concurrency=concurrency)


def _mistral(config: Any, key: str, metrics: SourceMetrics, pacer: Pacer, concurrency: int) -> Provider:
    from poller.providers.mistral import MistralProvider  # noqa: PLC0415

    return MistralProvider(config, key, metrics=metrics, pacer=pacer, max_concurrency=concurrency)


def _together(config: Any, key: str, metrics: SourceMetrics, pacer: Pacer, concurrency: int) -> Provider:
    from poller.providers.together import TogetherProvider  # noqa: PLC0415

    return TogetherProvider(config, key, metrics=metrics, pacer=pacer, max_concurrency=concurrency)


def _openrouter(config: Any, key: str, metrics: SourceMetrics, pacer: Pacer, concurrency: int) -> Provider:
    from poller.providers.openrouter import OpenRouterProvider  # noqa: PLC0415

    return OpenRouterProvider(config, key, metrics=metrics, pacer=pacer, max_concurrency=concurrency)


def _anthropic(config: Any, key: str, metrics: SourceMetrics, pacer: Pacer, concurrency: int) -> Provider:
    from poller.providers.anthropic import AnthropicProvider  # noqa: PLC0415

    return AnthropicProvider(config, key, metrics=metrics, pacer=pacer, max_concurrency=concurrency)


def _gemini(config: Any, key: str, metrics: SourceMetrics, pacer: Pacer, concurrency: int) -> Provider:
    from poller.providers.gemini import GeminiProvider  # noqa: PLC0415

    return GeminiProvider(config, key, metrics=metrics, pacer=pacer, max_concurrency=concurrency)


Factory = Callable[[Any, str, SourceMetrics, Pacer, int], Provider]
#: Adapters by `[[sources]] provider`.
FACTORIES: dict[str, Factory] = {
    "openai": _openai,
    "azure": _azure,
    "mistral": _mistral,
    "together": _together,
    "openrouter": _openrouter,
    "anthropic": _anthropic,
    "gemini": _gemini,
}


#: Prefixes a provider's own ids carry that batch-poller leaves out (`batches/` would be a '/' in topics).
_ID_PREFIXES: dict[str, str] = {"gemini": "batches/"}


def canonical_id(provider: str, batch_id: str) -> str:
    """The id batch-poller keys a batch by, from what a user typed (`batches/abc` and `abc` are one batch)."""
    prefix = _ID_PREFIXES.get(provider)
    return batch_id.removeprefix(prefix) if prefix else batch_id


def make_provider(
    config: SourceConfig, api_key: str, *, metrics: SourceMetrics, pacer: Pacer, max_concurrency: int
) -> Provider:
    """The adapter for one source (not yet entered: use it as an async context manager)."""
    return FACTORIES[config.provider_name](config, api_key, metrics, pacer, max_concurrency)


__all__ = ["Capabilities", "Page", "Provider", "canonical_id", "make_provider"]
