"""The OpenRouter batch adapter (`/batches`, what `openrouter`'s `client.batch` calls).

Bearer auth. `base_url` is the SDK's `server_url` (`https://openrouter.ai/api/v1`). The statuses are
OpenAI's eight, so they are the common lifecycle itself, but the object is OpenRouter's own: it stamps
only `created_at` and `finalized_at` (when it reached a final status), `expires_at` may be null or later
than 24 h, and a retrieve carries the results inline (list items never do). List pages run newest first
with an `after` id cursor, `limit` up to 100; list items collapse finalizing and cancelling into
in_progress; the adapter remembers the finer status its retrieves showed, so a list walk does not
read as a step backwards. The API has no cancel (only DELETE of a finished batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, Final
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, ValidationError

from poller.config.sources import OpenRouterSourceConfig
from poller.domain.lifecycle import FINAL_STATUSES, Status, is_status
from poller.domain.schedule import Pacer, parse_retry_after
from poller.domain.snapshot import InvalidSnapshotError, Snapshot, make_counts
from poller.errors import ApiError
from poller.metrics import SourceMetrics
from poller.providers._http import Endpoint, HttpProvider, excerpt
from poller.providers.base import Capabilities, Page

#: The most batches one `GET /batches` page returns (the API's `limit` maximum).
PAGE_SIZE: Final = 100
#: Statuses only a retrieve shows: list items say in_progress instead.
_RETRIEVE_ONLY: Final = frozenset({"finalizing", "cancelling"})
#: Batches whose finer status is remembered, at most (the oldest are forgotten first).
_REMEMBERED: Final = 100_000


class RequestCounts(BaseModel):
    model_config = ConfigDict(extra="allow")

    completed: int
    failed: int
    total: int


class OpenRouterBatch(BaseModel):
    """The fields of an OpenRouter `BatchObject` the adapter reads; the rest stays in the raw body."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: str
    created_at: int
    request_counts: RequestCounts
    endpoint: str | None = None
    expires_at: int | None = None
    finalized_at: int | None = None


class OpenRouterProvider(HttpProvider):
    name: ClassVar[str] = "openrouter"
    capabilities: ClassVar[Capabilities] = Capabilities(
        can_cancel=False, paging="cursor", page_size=PAGE_SIZE, newest_first=True
    )

    def __init__(
        self,
        config: OpenRouterSourceConfig,
        api_key: str,
        *,
        metrics: SourceMetrics,
        pacer: Pacer,
        max_concurrency: int = 8,
    ) -> None:
        endpoint = Endpoint(config.base_url, {"Authorization": f"Bearer {api_key}"}, config.timeout)
        super().__init__(endpoint, metrics=metrics, pacer=pacer, max_concurrency=max_concurrency)
        #: Batches a retrieve last showed finalizing or cancelling, by id.
        self._finer: dict[str, Status] = {}

    async def retrieve(self, batch_id: str) -> Snapshot:
        body = await self.request("retrieve", "GET", f"/batches/{quote(batch_id, safe='')}")
        snap = self.snapshot(body, "retrieve", batch_id)
        self._finer.pop(snap.id, None)
        if snap.status is not None and snap.status in _RETRIEVE_ONLY:
            self._finer[snap.id] = snap.status
            if len(self._finer) > _REMEMBERED:
                del self._finer[next(iter(self._finer))]
        return snap

    async def cancel(self, batch_id: str) -> Snapshot:
        """OpenRouter cannot cancel a batch (`capabilities.can_cancel` is False): always ApiError."""
        raise ApiError(f"openrouter has no batch cancel (batch {excerpt(batch_id, 80)})", code="unsupported")

    async def list_page(self, cursor: str | None) -> Page:
        page = await self.id_cursor_page("/batches", "after", cursor, PAGE_SIZE)
        return replace(page, snapshots=[self._refined(s) for s in page.snapshots])

    def _refined(self, snap: Snapshot) -> Snapshot:
        """A list item's in_progress as the finer status a retrieve showed (the list collapses them)."""
        finer = self._finer.get(snap.id)
        if finer is None:
            return snap
        if snap.status != "in_progress":
            del self._finer[snap.id]
            return snap
        return replace(snap, status=finer)

    def retry_after(self, headers: Mapping[str, str], now: float) -> float | None:
        """Retry-After when sent; else, with no request left, `X-RateLimit-Reset` (epoch milliseconds)."""
        asked = parse_retry_after(headers, now)
        if asked is not None:
            return asked
        lowered = {k.lower(): v for k, v in headers.items()}
        if lowered.get("x-ratelimit-remaining", "").strip() != "0":
            return None
        try:
            reset = float(lowered.get("x-ratelimit-reset", ""))
        except ValueError:
            return None
        if not math.isfinite(reset):
            return None
        if reset > 1e11:  # epoch milliseconds, as OpenRouter sends it (seconds would be year 5000+)
            reset /= 1000.0
        return max(reset - now, 0.0)

    def normalize(self, raw: Mapping[str, Any]) -> Snapshot:
        try:
            batch = OpenRouterBatch.model_validate(raw)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors()[:3])
            raise self._bad(f"answer is not a batch (bad fields: {excerpt(fields, 120)})", "batch_shape") from None
        except RecursionError:
            raise self._bad("answer is nested too deeply to be a batch", "batch_shape") from None
        status = batch.status if is_status(batch.status) else None
        entered: dict[str, int] = {"validating": batch.created_at}
        if status in FINAL_STATUSES and batch.finalized_at is not None:
            entered[batch.status] = batch.finalized_at
        rc = batch.request_counts
        try:
            return Snapshot(
                id=batch.id,
                status=status,  # type: ignore[arg-type]
                provider_status=batch.status,
                created_at=batch.created_at,
                raw=raw,
                entered=entered,
                counts=make_counts(rc.total, rc.completed, rc.failed),
                expires_at=batch.expires_at,
                endpoint=batch.endpoint,
            )
        except InvalidSnapshotError as exc:
            raise self.invalid(exc) from None
