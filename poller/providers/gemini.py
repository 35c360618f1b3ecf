"""The Gemini API batch mode adapter (`/{api_version}/batches`, what `google-genai`'s `client.batches` calls).

The key goes in `x-goog-api-key`. `base_url` and `api_version` are the SDK's `HttpOptions` (batch mode is
served under `v1beta`). A batch is a long-running Operation named `batches/{id}`; batch-poller keys it by
the part after `batches/` (either form is accepted). Its state, times and `batchStats` are in `metadata`.
Pages follow `nextPageToken`; their order is not documented, so every page is read. Times are RFC 3339
strings, counts int64 decimal strings, and fields at their default (a zero count, `done: false`) are left
out, as protobuf JSON does.

There is no cancelling or finalizing state, and no stamp for the start of RUNNING. Cancel answers an
empty object: the adapter reads the batch back after it. Rate limits come as 429 RESOURCE_EXHAUSTED with
the delay in the body (`google.rpc.RetryInfo`), a wrong key as 400 with reason `API_KEY_INVALID` (an auth
error here, so the source pauses as for a 401).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, Final
from urllib.parse import quote

from poller.config.sources import GeminiSourceConfig
from poller.domain.lifecycle import FINAL_STATUSES, Status
from poller.domain.schedule import Pacer
from poller.domain.snapshot import Counts, InvalidSnapshotError, Snapshot, check_count, make_counts
from poller.errors import ApiError
from poller.metrics import SourceMetrics
from poller.providers._http import Endpoint, HttpProvider, excerpt, parse_json
from poller.providers._times import rfc3339_required, rfc3339_seconds
from poller.providers.base import Capabilities, Page

#: Batches asked for per list page.
PAGE_SIZE: Final = 100
#: Gemini's own state (`metadata.state`) -> the common lifecycle.
STATUS_MAP: Final[dict[str, Status]] = {
    "BATCH_STATE_PENDING": "validating",
    "BATCH_STATE_RUNNING": "in_progress",
    "BATCH_STATE_SUCCEEDED": "completed",
    "BATCH_STATE_FAILED": "failed",
    "BATCH_STATE_CANCELLED": "cancelled",
    "BATCH_STATE_EXPIRED": "expired",
}
BATCH_NAME: Final = re.compile(r"^batches/[^/]+$")
_DURATION: Final = re.compile(r"^\s*(?P<seconds>[0-9]+(?:\.[0-9]*)?)s\s*$")


def _count(name: str, value: object) -> int:
    """An int64 count as protobuf JSON writes it (a decimal string), or a plain integer; absent is zero."""
    if value is None:
        return 0
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return check_count(name, value)


def batch_counts(stats: object) -> Counts | None:
    """`batchStats` as total / completed (successful) / failed; None when the batch reports none."""
    if stats is None:
        return None
    if not isinstance(stats, dict):
        raise InvalidSnapshotError("batchStats", "expected an object")
    return make_counts(
        _count("batchStats.requestCount", stats.get("requestCount")),
        _count("batchStats.successfulRequestCount", stats.get("successfulRequestCount")),
        _count("batchStats.failedRequestCount", stats.get("failedRequestCount")),
        prefix="batchStats",
    )


def retry_delay(body: Any) -> float | None:
    """The delay of a `google.rpc.RetryInfo` among an error body's details (`"retryDelay": "12.5s"`)."""
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match is not None:
                return float(match["seconds"])
    return None


def _reason(body: Any) -> str | None:
    """The `google.rpc.ErrorInfo` reason of an error body (`API_KEY_INVALID`, ...)."""
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo"):
            reason = detail.get("reason")
            return reason if isinstance(reason, str) else None
    return None


class GeminiProvider(HttpProvider):
    name: ClassVar[str] = "gemini"
    id_field: ClassVar[str] = "name"
    capabilities: ClassVar[Capabilities] = Capabilities(paging="token", page_size=PAGE_SIZE, newest_first=False)

    def __init__(
        self,
        config: GeminiSourceConfig,
        api_key: str,
        *,
        metrics: SourceMetrics,
        pacer: Pacer,
        max_concurrency: int = 8,
    ) -> None:
        endpoint = Endpoint(f"{config.base_url}/{config.api_version}", {"x-goog-api-key": api_key}, config.timeout)
        super().__init__(endpoint, metrics=metrics, pacer=pacer, max_concurrency=max_concurrency)

    @staticmethod
    def _path(batch_id: str) -> str:
        """The batch's path; the id is its resource name without `batches/` (either form is accepted)."""
        name = batch_id if batch_id.startswith("batches/") else f"batches/{batch_id}"
        if not BATCH_NAME.match(name):
            raise ApiError(
                f"{excerpt(batch_id, 80)!r} is not a Gemini batch name (batches/...)", status=400, code="bad_name"
            )
        return "/" + "batches/" + quote(name.removeprefix("batches/"), safe="")

    async def retrieve(self, batch_id: str) -> Snapshot:
        body = await self.request("retrieve", "GET", self._path(batch_id))
        return self.snapshot(body, "retrieve", batch_id.removeprefix("batches/"))

    async def cancel(self, batch_id: str) -> Snapshot:
        """`:cancel` answers `{}`; the batch as a retrieve right after it shows it."""
        await self.request("cancel", "POST", self._path(batch_id) + ":cancel")
        return await self.retrieve(batch_id)

    async def list_page(self, cursor: str | None) -> Page:
        query = {"pageSize": str(PAGE_SIZE)}
        if cursor:
            query["pageToken"] = cursor
        body = await self.request("list", "GET", "/batches", query)
        if not isinstance(body, dict):
            raise self._bad("list answer is not a JSON object", "list_shape")
        token = body.get("nextPageToken")
        page = self.page(body.get("operations", []), None)  # an empty list is left out altogether
        if isinstance(token, str) and token:
            return replace(page, next=token)
        return page

    def normalize(self, raw: Mapping[str, Any]) -> Snapshot:
        name, meta = raw.get("name"), raw.get("metadata")
        if not isinstance(name, str) or not BATCH_NAME.match(name):
            raise self._bad("answer is not a batch (no batches/... name)", "batch_shape")
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), str):
            raise self._bad("answer is not a batch (no metadata.state)", "batch_shape")
        state: str = meta["state"]
        status = STATUS_MAP.get(state)
        try:
            created = rfc3339_required("metadata.createTime", meta.get("createTime"))
            entered: dict[str, int] = {"validating": created}
            if status in FINAL_STATUSES:
                ended = rfc3339_seconds("metadata.endTime", meta.get("endTime"))
                if ended is None:
                    ended = rfc3339_seconds("metadata.updateTime", meta.get("updateTime"))
                if ended is not None:
                    entered[status] = ended
            return Snapshot(
                # The bare id: `batches/` would be a '/' in MQTT topics and URLs; raw keeps the full name.
                id=name.removeprefix("batches/"),
                status=status,
                provider_status=state,
                created_at=created,
                raw=raw,
                entered=entered,
                counts=batch_counts(meta.get("batchStats")),
            )
        except InvalidSnapshotError as exc:
            raise self.invalid(exc) from None

    def error_detail(self, body: Any) -> tuple[str, str | None] | None:
        """`{"error": {"code": 404, "message", "status": "NOT_FOUND"}}`; the status name is the code."""
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("status"), str):
            return excerpt(error.get("message") or ""), _reason(body) or error["status"]
        return super().error_detail(body)

    def _error(  # noqa: PLR0917 - the base's signature
        self, kind: str, status: int, raw: bytes, ctype: str, retry_after: float | None, request_id: str | None
    ) -> ApiError:
        """The base's error, plus the RetryInfo delay of a 429 and a wrong key's 400 as an auth error."""
        try:
            body = parse_json(raw) if raw[:1] == b"{" else None
        except ValueError:
            body = None
        if status in {429, 503} and retry_after is None and (delay := retry_delay(body)) is not None:
            retry_after = delay
            if status == 429:  # the base paused without a delay: pause again, now for as long as asked
                self.pacer.penalize(self._monotonic(), delay)
        error = super()._error(kind, status, raw, ctype, retry_after, request_id)
        if status == 400 and _reason(body) == "API_KEY_INVALID":
            error.status = 401  # told as 400, but it is the key: pause the source as for any auth error
        return error
