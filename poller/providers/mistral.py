"""The Mistral batch jobs adapter (`/v1/batch/jobs`, what `mistralai`'s `client.batch.jobs` calls).

Bearer auth. `base_url` is the SDK's `server_url` (`https://api.mistral.ai`); paths carry `/v1`. The list
is offset-paged (`page` from 0, `page_size`, `order_by=-created`) and answers the `total`, so the cursor
this adapter hands out is the next page number. Statuses map one to one onto the common lifecycle but
for finalizing, which Mistral does not have (a job is RUNNING until it ends). Only `created_at`,
`started_at` and `completed_at` are stamped; the cancel request itself is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, Final
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, ValidationError

from poller.config.sources import MistralSourceConfig
from poller.domain.lifecycle import FINAL_STATUSES, Status
from poller.domain.schedule import Pacer, parse_retry_after
from poller.domain.snapshot import InvalidSnapshotError, Snapshot, make_counts
from poller.metrics import SourceMetrics
from poller.providers._http import Endpoint, HttpProvider, excerpt
from poller.providers.base import Capabilities, Page

#: The SDK's default `page_size`.
PAGE_SIZE: Final = 100
#: Mistral's own status -> the common lifecycle.
STATUS_MAP: Final[dict[str, Status]] = {
    "QUEUED": "validating",
    "RUNNING": "in_progress",
    "SUCCESS": "completed",
    "FAILED": "failed",
    "TIMEOUT_EXCEEDED": "expired",
    "CANCELLATION_REQUESTED": "cancelling",
    "CANCELLED": "cancelled",
}
#: Its rate limits are per minute and it sends no reset time: a spent minute is waited out whole.
MINUTE: Final = 60.0


class MistralJob(BaseModel):
    """The fields of a Mistral `BatchJob` the adapter reads; the rest stays in the raw body."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: str
    created_at: int
    total_requests: int
    completed_requests: int
    succeeded_requests: int
    failed_requests: int
    endpoint: str | None = None
    started_at: int | None = None
    completed_at: int | None = None
    metadata: dict[str, Any] | None = None


class MistralProvider(HttpProvider):
    name: ClassVar[str] = "mistral"
    capabilities: ClassVar[Capabilities] = Capabilities(paging="offset", page_size=PAGE_SIZE, newest_first=True)

    def __init__(
        self,
        config: MistralSourceConfig,
        api_key: str,
        *,
        metrics: SourceMetrics,
        pacer: Pacer,
        max_concurrency: int = 8,
    ) -> None:
        endpoint = Endpoint(config.base_url, {"Authorization": f"Bearer {api_key}"}, config.timeout)
        super().__init__(endpoint, metrics=metrics, pacer=pacer, max_concurrency=max_concurrency)

    async def retrieve(self, batch_id: str) -> Snapshot:
        body = await self.request("retrieve", "GET", f"/v1/batch/jobs/{quote(batch_id, safe='')}")
        return self.snapshot(body, "retrieve", batch_id)

    async def cancel(self, batch_id: str) -> Snapshot:
        body = await self.request("cancel", "POST", f"/v1/batch/jobs/{quote(batch_id, safe='')}/cancel")
        return self.snapshot(body, "cancel", batch_id)

    async def list_page(self, cursor: str | None) -> Page:
        """One page, newest first; the cursor is the page number (offset pages shift as jobs are created,
        so a walk may see a job twice, never miss one)."""
        number = int(cursor) if cursor else 0
        query = {"page": str(number), "page_size": str(PAGE_SIZE), "order_by": "-created"}
        body = await self.request("list", "GET", "/v1/batch/jobs", query)
        if not isinstance(body, dict):
            raise self._bad("list answer is not a JSON object", "list_shape")
        total = body.get("total")
        if isinstance(total, bool) or not isinstance(total, int):
            raise self._bad("list answer has no total", "list_shape")
        items = body.get("data")
        page = self.page([] if items is None else items, None)
        if items and (number + 1) * PAGE_SIZE < total:
            return replace(page, next=str(number + 1))
        return page

    def retry_after(self, headers: Mapping[str, str], now: float) -> float | None:
        """Retry-After when sent; else a spent per-minute request budget waits a minute."""
        asked = parse_retry_after(headers, now)
        if asked is not None:
            return asked
        lowered = {k.lower(): v for k, v in headers.items()}
        if lowered.get("x-ratelimit-remaining-req-minute", "").strip() == "0":
            return MINUTE
        return None

    def error_detail(self, body: Any) -> tuple[str, str | None] | None:
        """`{"object": "error", "message", "type", "code"}`, or the gateway's `{"message": ...}`."""
        if isinstance(body, dict) and "message" in body and "error" not in body:
            code = body.get("code") or body.get("type")
            return excerpt(body.get("message") or ""), None if code is None else str(code)
        return super().error_detail(body)

    def normalize(self, raw: Mapping[str, Any]) -> Snapshot:
        try:
            job = MistralJob.model_validate(raw)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors()[:3])
            raise self._bad(f"answer is not a batch job (bad fields: {excerpt(fields, 120)})", "batch_shape") from None
        except RecursionError:
            raise self._bad("answer is nested too deeply to be a batch job", "batch_shape") from None
        status = STATUS_MAP.get(job.status)
        entered: dict[str, int] = {"validating": job.created_at}
        if job.started_at is not None:
            entered["in_progress"] = job.started_at
        if status in FINAL_STATUSES and job.completed_at is not None:
            entered[status] = job.completed_at
        metadata = None if job.metadata is None else {k: v for k, v in job.metadata.items() if isinstance(v, str)}
        try:
            return Snapshot(
                id=job.id,
                status=status,
                provider_status=job.status,
                created_at=job.created_at,
                raw=raw,
                entered=entered,
                counts=make_counts(job.total_requests, job.succeeded_requests, job.failed_requests),
                metadata=metadata,
                endpoint=job.endpoint,
            )
        except InvalidSnapshotError as exc:
            raise self.invalid(exc) from None
