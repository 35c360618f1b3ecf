"""CLI commands that talk to a provider's API directly: `cancel` and `check-config --probe`."""

from __future__ import annotations

import sys
from typing import Any

from poller.config import Config, SourceConfig
from poller.domain.schedule import Pacer
from poller.errors import ApiError, BadResponseError
from poller.metrics import Metrics
from poller.providers import make_provider
from poller.providers.base import Provider


def _provider(source: SourceConfig) -> Provider:
    metrics = Metrics().source(source.source_name)
    return make_provider(source, source.api_key(), metrics=metrics, pacer=Pacer(5.0), max_concurrency=2)


def _failure(exc: ApiError | BadResponseError) -> str:
    request = f" (request id {exc.request_id})" if exc.request_id else ""
    return f"{exc}{request}"


async def cancel(source: SourceConfig, batch_id: str) -> int:
    async with _provider(source) as provider:
        if not provider.capabilities.can_cancel:
            print(f"cancel: provider {provider.name} has no cancel", file=sys.stderr)
            return 1
        try:
            snap = await provider.cancel(batch_id)
        except (ApiError, BadResponseError) as exc:
            print(f"cancel failed: {_failure(exc)}", file=sys.stderr)
            return 1
    print(f"{snap.id}: {snap.provider_status}")
    return 0


async def probe(config: Config) -> int:
    """Ask each source's API once whether `base_url` and the key work; 0 when every one does."""
    results = await probe_sources(config)
    for name, result in results.items():
        if result["ok"]:
            print(f"source {name}: OK, {result['base_url']} {result['detail']}")
        else:
            fix = f"\n  fix: {result['fix']}" if result["fix"] else ""
            print(f"source {name}: FAILED at {result['base_url']}: {result['detail']}{fix}", file=sys.stderr)
    return 0 if all(r["ok"] for r in results.values()) else 1


async def probe_sources(config: Config) -> dict[str, dict[str, Any]]:
    """Per source: `ok`, its `base_url`, what the API answered or why it failed (`detail`), and a `fix`."""
    results: dict[str, dict[str, Any]] = {}
    for name, source in config.named_sources().items():
        async with _provider(source) as provider:
            try:
                what = await _ask(provider)
            except ApiError as exc:
                hint = _hint(exc, source).removeprefix("\n  fix: ")
                results[name] = {"ok": False, "base_url": source.base_url, "detail": _failure(exc), "fix": hint or None}
                continue
        results[name] = {"ok": True, "base_url": source.base_url, "detail": what, "fix": None}
    return results


async def _ask(provider: Provider) -> str:
    if provider.capabilities.can_list:
        page = await provider.list_page(None)
        return f"answers and lists {len(page.snapshots)} batch(es) on its first page"
    try:
        await provider.retrieve("batch_poller_probe")
    except ApiError as exc:
        if exc.status == 404 and exc.from_api and not isinstance(exc, BadResponseError):
            return "answers (its own JSON 404 for an unknown id)"
        raise
    return "answers"


def _hint(exc: ApiError, source: SourceConfig) -> str:
    key = f"sources.{source.source_name}"
    if isinstance(exc, BadResponseError):
        return f"\n  fix: check {key}.base_url: the answer is not this provider's batch API"
    if exc.status in {401, 403}:
        where = f"${source.api_key_env}" if source.api_key_env else f"the file {source.api_key_file}"
        return (
            f"\n  fix: the API rejects the API key read from {where} ({key}.api_key_env / api_key_file): "
            "check the key and its permissions"
        )
    if exc.status == 404 or (exc.status is not None and not exc.from_api):
        return f"\n  fix: check {key}.base_url: it should be the API root the provider documents (for OpenAI, .../v1)"
    if exc.status is None:
        return f"\n  fix: check {key}.base_url and the network: no answer came from there"
    return ""
