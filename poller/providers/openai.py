"""The OpenAI Batch API adapter, and Azure OpenAI's (the same API with another key header and an
`api-version`). Also serves the compatible servers: Groq, the LiteLLM proxy, Llama Stack.

OpenAI's statuses are the common lifecycle itself; each status's `{status}_at` stamp says when it was
entered (`created_at` for validating). List pages run newest first with an `after` id cursor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

from pydantic import ValidationError

from poller.config.sources import AzureSourceConfig, OpenAISourceConfig
from poller.domain.lifecycle import STATUSES, is_status
from poller.domain.schedule import Pacer
from poller.domain.snapshot import Counts, InvalidSnapshotError, Snapshot, make_counts
from poller.metrics import SourceMetrics
from poller.providers._http import Endpoint, HttpProvider, excerpt
from poller.providers.base import Capabilities, Page
from poller.providers.openai_types import Batch

#: The most batches one `GET /batches` page returns (the API's `limit` maximum).
PAGE_SIZE = 100
_STAMPED = tuple(s for s in STATUSES if s != "validating")
#: (status, the field that stamps when the batch entered it)
_STAMPS = tuple((s, f"{s}_at") for s in _STAMPED)
#: Integer fields pydantic would also take from a JSON string or boolean ("17", true): not numbers we trust.
_INTEGERS = ("created_at", "expires_at", *(f"{s}_at" for s in _STAMPED))
_COUNTS = ("total", "completed", "failed")
#: The keys of `request_counts` in the plain shape of the counts-only path (`rebase`), in any order.
_COUNT_KEYS = frozenset(_COUNTS)
#: A tuple: `isinstance` with `bool | str` costs twice as much, on every item of every page.
_LOOSE = (bool, str)


def _loose_integer(raw: Mapping[str, Any]) -> InvalidSnapshotError | None:
    for name in _INTEGERS:
        if isinstance(value := raw.get(name), _LOOSE):
            return _not_integer(name, value)
    rc = raw.get("request_counts")
    if isinstance(rc, Mapping):
        for name in _COUNTS:
            if isinstance(value := rc.get(name), _LOOSE):
                return _not_integer(f"request_counts.{name}", value)
    return None


def _not_integer(name: str, value: object) -> InvalidSnapshotError:
    return InvalidSnapshotError(name, f"expected an integer, got {type(value).__name__}")


class OpenAIProvider(HttpProvider):
    name: ClassVar[str] = "openai"
    capabilities: ClassVar[Capabilities] = Capabilities(paging="cursor", page_size=PAGE_SIZE, newest_first=True)
    recounts: ClassVar[bool] = True

    def __init__(
        self,
        config: OpenAISourceConfig | AzureSourceConfig,
        api_key: str,
        *,
        metrics: SourceMetrics,
        pacer: Pacer,
        max_concurrency: int = 8,
    ) -> None:
        super().__init__(
            self._endpoint_for(config, api_key), metrics=metrics, pacer=pacer, max_concurrency=max_concurrency
        )

    @staticmethod
    def _endpoint_for(config: OpenAISourceConfig | AzureSourceConfig, api_key: str) -> Endpoint:
        headers = {"Authorization": f"Bearer {api_key}"}
        if isinstance(config, OpenAISourceConfig):
            if config.organization:
                headers["OpenAI-Organization"] = config.organization
            if config.project:
                headers["OpenAI-Project"] = config.project
        return Endpoint(config.base_url, headers, config.timeout)

    async def retrieve(self, batch_id: str) -> Snapshot:
        body = await self.request("retrieve", "GET", f"/batches/{quote(batch_id, safe='')}")
        return self.snapshot(body, "retrieve", batch_id)

    async def cancel(self, batch_id: str) -> Snapshot:
        body = await self.request("cancel", "POST", f"/batches/{quote(batch_id, safe='')}/cancel")
        return self.snapshot(body, "cancel", batch_id)

    async def list_page(self, cursor: str | None) -> Page:
        return await self.id_cursor_page("/batches", "after", cursor, PAGE_SIZE)

    def normalize(self, raw: Mapping[str, Any]) -> Snapshot:
        try:
            batch = Batch.model_validate(raw)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors()[:3])
            raise self._bad(f"answer is not a batch (bad fields: {excerpt(fields, 120)})", "batch_shape") from None
        except RecursionError:
            raise self._bad("answer is nested too deeply to be a batch", "batch_shape") from None
        if (loose := _loose_integer(raw)) is not None:
            raise self.invalid(loose)
        entered: dict[str, int] = {"validating": batch.created_at}
        for status, stamp in _STAMPS:
            when = getattr(batch, stamp, None)
            if when is not None:
                entered[status] = when
        rc = batch.request_counts
        try:
            return Snapshot(
                id=batch.id,
                status=batch.status if is_status(batch.status) else None,  # type: ignore[arg-type]
                provider_status=batch.status,
                created_at=batch.created_at,
                raw=raw,
                entered=entered,
                counts=None if rc is None else make_counts(rc.total, rc.completed, rc.failed),
                expires_at=batch.expires_at,
                metadata=batch.metadata,
                endpoint=batch.endpoint,
            )
        except InvalidSnapshotError as exc:
            raise self.invalid(exc) from None

    def rebase(self, raw: Mapping[str, Any], counts: Counts) -> Mapping[str, Any] | None:
        rc = raw.get("request_counts")
        if type(rc) is not dict or rc.keys() != _COUNT_KEYS:
            return None  # absent, null, or other keys besides the three: `normalize` decides
        before = dict(raw)
        before["request_counts"] = {key: getattr(counts, key) for key in rc}
        return before

    def recount(self, raw: Mapping[str, Any]) -> Snapshot:
        """The snapshot `normalize` makes, for a body that differs only in its request counts from one it
        normalized before: those three checked, the rest taken as it is (checked then, to the byte).

        Whatever `normalize` would have to coerce or refuse goes to `normalize`: counts that are not plain
        integers or not true (its errors and their counting stay its own), and times that are not plain
        integers (it makes a float such as 1.7e9 an int).
        """
        rc = raw["request_counts"]
        try:
            counts = make_counts(rc["total"], rc["completed"], rc["failed"])
        except InvalidSnapshotError:
            return self.normalize(raw)
        created_at, expires_at = raw["created_at"], raw.get("expires_at")
        if type(created_at) is not int or not (expires_at is None or type(expires_at) is int):
            return self.normalize(raw)
        entered: dict[str, int] = {"validating": created_at}
        for status, stamp in _STAMPS:
            when = raw.get(stamp)
            if when is not None:
                if type(when) is not int:
                    return self.normalize(raw)
                entered[status] = when
        provider_status, metadata = raw["status"], raw.get("metadata")
        return Snapshot.prechecked(
            raw["id"],
            provider_status if is_status(provider_status) else None,
            provider_status,
            created_at,
            raw,
            entered,
            counts,
            expires_at,
            None if metadata is None else dict(metadata),  # a copy, as the model makes one
            raw["endpoint"],
        )


class AzureProvider(OpenAIProvider):
    """Azure OpenAI: the key in `api-key`, and `api-version` on every request of the classic API."""

    name: ClassVar[str] = "azure"

    @staticmethod
    def _endpoint_for(config: OpenAISourceConfig | AzureSourceConfig, api_key: str) -> Endpoint:
        params = (
            {"api-version": config.api_version} if isinstance(config, AzureSourceConfig) and config.api_version else {}
        )
        return Endpoint(config.base_url, {"api-key": api_key}, config.timeout, params)
