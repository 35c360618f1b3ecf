"""The Together batch adapter (`/v1/batches`, what `together`'s `client.batches` calls).

Bearer auth. `base_url` is the SDK's (`https://api.together.ai`); paths carry `/v1`. The list is one
unpaged array of every job, so one request refreshes them all. Together reports no request counts, only
`progress` (a percentage, left in the raw body), and no finalizing or cancelling phase. Its timestamps
are RFC 3339 strings (unix seconds are accepted too); `job_deadline` is the expiry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Final
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, ValidationError

from poller.config.sources import TogetherSourceConfig
from poller.domain.lifecycle import FINAL_STATUSES, Status
from poller.domain.schedule import Pacer, parse_retry_after
from poller.domain.snapshot import InvalidSnapshotError, Snapshot
from poller.metrics import SourceMetrics
from poller.providers._http import Endpoint, HttpProvider, excerpt
from poller.providers.base import Capabilities, Page

#: Together's own status -> the common lifecycle.
STATUS_MAP: Final[dict[str, Status]] = {
    "VALIDATING": "validating",
    "IN_PROGRESS": "in_progress",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "EXPIRED": "expired",
    "CANCELLED": "cancelled",
}
#: The one list page holds every job: planning counts it as a single page for any number of batches.
SINGLE_PAGE: Final = 1_000_000


def epoch_seconds(name: str, value: object) -> int | None:
    """An RFC 3339 string (or unix seconds) as whole epoch seconds; None for null or Go's zero time.

    InvalidSnapshotError for anything else; the range is checked by the snapshot.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidSnapshotError(name, "expected an RFC 3339 time, got bool")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return math.floor(value)
    if not isinstance(value, str):
        raise InvalidSnapshotError(name, f"expected an RFC 3339 time, got {type(value).__name__}")
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidSnapshotError(name, f"{excerpt(value, 40)!r} is not an RFC 3339 time") from None
    if when.year <= 1:  # Go's zero time.Time: never set
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return math.floor(when.timestamp())


class TogetherJob(BaseModel):
    """The fields of a Together `BatchJob` the adapter reads; the rest stays in the raw body."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: str
    created_at: str | int | float
    completed_at: str | int | float | None = None
    job_deadline: str | int | float | None = None
    endpoint: str | None = None


class TogetherProvider(HttpProvider):
    name: ClassVar[str] = "together"
    # The order of the one list is not documented: nothing is concluded from it.
    capabilities: ClassVar[Capabilities] = Capabilities(paging="single", page_size=SINGLE_PAGE, newest_first=False)

    def __init__(
        self,
        config: TogetherSourceConfig,
        api_key: str,
        *,
        metrics: SourceMetrics,
        pacer: Pacer,
        max_concurrency: int = 8,
    ) -> None:
        endpoint = Endpoint(config.base_url, {"Authorization": f"Bearer {api_key}"}, config.timeout)
        super().__init__(endpoint, metrics=metrics, pacer=pacer, max_concurrency=max_concurrency)

    async def retrieve(self, batch_id: str) -> Snapshot:
        body = await self.request("retrieve", "GET", f"/v1/batches/{quote(batch_id, safe='')}")
        return self.snapshot(body, "retrieve", batch_id)

    async def cancel(self, batch_id: str) -> Snapshot:
        body = await self.request("cancel", "POST", f"/v1/batches/{quote(batch_id, safe='')}/cancel")
        return self.snapshot(body, "cancel", batch_id)

    async def list_page(self, cursor: str | None) -> Page:
        """Every job, in one page; there is never a next one (`cursor` is never handed out)."""
        del cursor
        body = await self.request("list", "GET", "/v1/batches")
        return self.page(body, None)

    def retry_after(self, headers: Mapping[str, str], now: float) -> float | None:
        """Retry-After when sent; else, with no request left, `x-ratelimit-reset` (seconds to wait)."""
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
        return reset if math.isfinite(reset) and reset >= 0 else None

    def normalize(self, raw: Mapping[str, Any]) -> Snapshot:
        try:
            job = TogetherJob.model_validate(raw)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors()[:3])
            raise self._bad(f"answer is not a batch job (bad fields: {excerpt(fields, 120)})", "batch_shape") from None
        except RecursionError:
            raise self._bad("answer is nested too deeply to be a batch job", "batch_shape") from None
        status = STATUS_MAP.get(job.status)
        try:
            created = epoch_seconds("created_at", job.created_at) or 0  # unset: refused by the snapshot
            entered: dict[str, int] = {"validating": created}
            ended = epoch_seconds("completed_at", job.completed_at)
            if status in FINAL_STATUSES and ended is not None:
                entered[status] = ended
            return Snapshot(
                id=job.id,
                status=status,
                provider_status=job.status,
                created_at=created,
                raw=raw,
                entered=entered,
                expires_at=epoch_seconds("job_deadline", job.job_deadline),
                endpoint=job.endpoint,
            )
        except InvalidSnapshotError as exc:
            raise self.invalid(exc) from None
