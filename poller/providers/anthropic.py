"""The Anthropic Message Batches adapter (`/v1/messages/batches`, what `anthropic`'s `client.messages.batches` calls).

The key goes as the installed SDK sends it (`Authorization: Bearer`), with `anthropic-version`. `base_url`
is the SDK's (`https://api.anthropic.com`); paths carry `/v1`. Pages of up to 1,000 run newest first with an
`after_id` cursor. Timestamps are RFC 3339 strings.

A batch is `in_progress`, `canceling` or `ended`: there is no validating or finalizing, and `ended` is not
an outcome. It resolves from `cancel_initiated_at` and the counts: a cancel makes it cancelled; otherwise
any request that expired makes it expired (the 24 hours ran out first); otherwise it completed. No counter
moves before the batch ends (`processing` holds every request), so there is no progress to report: the
normalized counts are left out until then (the provider's own stay in the raw body).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar, Final
from urllib.parse import quote

from poller.config.sources import AnthropicSourceConfig
from poller.domain.lifecycle import Status
from poller.domain.schedule import Pacer, parse_retry_after
from poller.domain.snapshot import Counts, InvalidSnapshotError, Snapshot, check_count, make_counts
from poller.metrics import SourceMetrics
from poller.providers._http import Endpoint, HttpProvider, excerpt
from poller.providers._times import rfc3339_required, rfc3339_seconds
from poller.providers.base import Capabilities, Page

#: The most batches one `GET /v1/messages/batches` page returns (the API's `limit` maximum).
PAGE_SIZE: Final = 1_000
#: `request_counts`, every one of which the API always sends.
COUNT_FIELDS: Final = ("processing", "succeeded", "errored", "canceled", "expired")
#: `anthropic-ratelimit-<limit>-remaining`; each limit has its `-reset` time beside it.
_REMAINING: Final = re.compile(r"^anthropic-ratelimit-(?P<limit>[a-z0-9-]+)-remaining$")


def resolve(processing_status: str, counts: Mapping[str, int], cancel_initiated: bool) -> Status | None:
    """The common status of an Anthropic batch; None for a processing status the API did not document."""
    match processing_status:
        case "in_progress":
            return "in_progress"
        case "canceling":
            return "cancelling"
        case "ended" if cancel_initiated:
            return "cancelled"
        case "ended" if counts.get("expired", 0) > 0:
            return "expired"
        case "ended":
            return "completed"
    return None


class AnthropicProvider(HttpProvider):
    name: ClassVar[str] = "anthropic"
    capabilities: ClassVar[Capabilities] = Capabilities(paging="cursor", page_size=PAGE_SIZE, newest_first=True)

    def __init__(
        self,
        config: AnthropicSourceConfig,
        api_key: str,
        *,
        metrics: SourceMetrics,
        pacer: Pacer,
        max_concurrency: int = 8,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}", "anthropic-version": config.anthropic_version}
        if config.workspace_id:
            headers["anthropic-workspace-id"] = config.workspace_id
        endpoint = Endpoint(config.base_url, headers, config.timeout)
        super().__init__(endpoint, metrics=metrics, pacer=pacer, max_concurrency=max_concurrency)

    async def retrieve(self, batch_id: str) -> Snapshot:
        body = await self.request("retrieve", "GET", f"/v1/messages/batches/{quote(batch_id, safe='')}")
        return self.snapshot(body, "retrieve", batch_id)

    async def cancel(self, batch_id: str) -> Snapshot:
        body = await self.request("cancel", "POST", f"/v1/messages/batches/{quote(batch_id, safe='')}/cancel")
        return self.snapshot(body, "cancel", batch_id)

    async def list_page(self, cursor: str | None) -> Page:
        return await self.id_cursor_page("/v1/messages/batches", "after_id", cursor, PAGE_SIZE)

    def retry_after(self, headers: Mapping[str, str], now: float) -> float | None:
        """Retry-After when sent; else the latest reset among the rate limits with nothing remaining."""
        asked = parse_retry_after(headers, now)
        if asked is not None:
            return asked
        lowered = {k.lower(): v for k, v in headers.items()}
        waits: list[float] = []
        for key, remaining in lowered.items():
            match = _REMAINING.match(key)
            if match is None or remaining.strip() != "0":
                continue
            reset = lowered.get(f"anthropic-ratelimit-{match['limit']}-reset")
            try:
                when = rfc3339_required("reset", reset)
            except InvalidSnapshotError:
                continue
            waits.append(max(when - now, 0.0))
        return max(waits, default=None)

    def normalize(self, raw: Mapping[str, Any]) -> Snapshot:
        if raw.get("type") != "message_batch":
            raise self._bad("answer is not a message batch (type is not 'message_batch')", "batch_shape")
        batch_id, status = raw.get("id"), raw.get("processing_status")
        if not isinstance(batch_id, str) or not batch_id:
            raise self._bad("answer is not a message batch (no id)", "batch_shape")
        if not isinstance(status, str):
            raise self._bad("answer is not a message batch (no processing_status)", "batch_shape")
        counts = raw.get("request_counts")
        if not isinstance(counts, dict) or any(f not in counts for f in COUNT_FIELDS):
            raise self._bad("answer is not a message batch (bad request_counts)", "batch_shape")
        try:
            tally = {f: check_count(f"request_counts.{f}", counts[f]) for f in COUNT_FIELDS}
            created = rfc3339_required("created_at", raw.get("created_at"))
            cancel_at = rfc3339_seconds("cancel_initiated_at", raw.get("cancel_initiated_at"))
            ended_at = rfc3339_seconds("ended_at", raw.get("ended_at"))
            common = resolve(status, tally, cancel_at is not None)
            entered: dict[str, int] = {"in_progress": created}  # every batch starts processing
            if cancel_at is not None:
                entered["cancelling"] = cancel_at
            if ended_at is not None and common in {"completed", "expired", "cancelled"}:
                entered[common] = ended_at
            return Snapshot(
                id=batch_id,
                status=common,
                provider_status=status,
                created_at=created,
                raw=raw,
                entered=entered,
                # Before the end every request is `processing`: counts that never move would read as a stall.
                counts=normalized_counts(tally) if status == "ended" else None,
                expires_at=rfc3339_seconds("expires_at", raw.get("expires_at")),
            )
        except InvalidSnapshotError as exc:
            raise self.invalid(exc) from None

    def error_detail(self, body: Any) -> tuple[str, str | None] | None:
        """`{"type": "error", "error": {"type", "message"}}`; the error's type is the code."""
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("type"), str):
            return excerpt(error.get("message") or ""), error["type"]
        return super().error_detail(body)


def normalized_counts(tally: Mapping[str, int]) -> Counts:
    """Total is every request; completed the succeeded ones, failed the errored (canceled and expired are neither)."""
    total = sum(tally[f] for f in COUNT_FIELDS)
    return make_counts(total, tally["succeeded"], tally["errored"])
