"""A simulated Gemini API batch mode, wire-compatible with the official `google-genai` SDK (`client.batches`,
pointed at it with `HttpOptions(base_url=..., api_version="v1beta")`): create, get, list and cancel.

Routes: `POST /v1beta/models/{model}:batchGenerateContent`, `GET /v1beta/batches/{id}`, `GET /v1beta/batches`
(`pageSize`, opaque `pageToken` -> `nextPageToken`; newest first here, though the API does not promise an
order) and `POST /v1beta/batches/{id}:cancel` (answers `{}`). A batch is a long-running Operation named
`batches/...` whose `metadata` holds the batch: `state`, `createTime` / `updateTime` / `endTime` (RFC 3339
with nanoseconds) and `batchStats` (int64 counts as decimal strings). As protobuf JSON does, fields at their
default (zero counts, `done: false`, an empty list) are left out.

The shared lifecycle shows as PENDING (validating), RUNNING (in_progress and finalizing) and the four ends;
Gemini has no cancelling state, so a batch being cancelled keeps the state it had until it is CANCELLED.
Batches expire after 48 hours. Errors are Google's `{"error": {"code", "message", "status", "details"}}`:
a missing key is 403 PERMISSION_DENIED, a wrong one 400 INVALID_ARGUMENT with reason API_KEY_INVALID, a 429
fault RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` delay when the fault sets `retry_after`.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from poller.sim._draw import draw_lifecycle, status_before_cancel
from poller.sim.base import SimApi, SimRequestError, json_object
from poller.sim.faults import Fault
from poller.sim.lifecycle import Outcome, SimBatch

API_VERSION: Final = "v1beta"
WINDOW: Final = 48 * 3600
DEFAULT_PAGE: Final = 50
MAX_PAGE: Final = 1000
#: The common lifecycle -> Gemini's `metadata.state` (cancelling shows the state before the cancel).
WIRE_STATE: Final[dict[str, str]] = {
    "validating": "BATCH_STATE_PENDING",
    "in_progress": "BATCH_STATE_RUNNING",
    "finalizing": "BATCH_STATE_RUNNING",
    "completed": "BATCH_STATE_SUCCEEDED",
    "failed": "BATCH_STATE_FAILED",
    "expired": "BATCH_STATE_EXPIRED",
    "cancelled": "BATCH_STATE_CANCELLED",
}
#: What each state means on the common lifecycle.
COMMON: Final[dict[str, str]] = {
    "BATCH_STATE_PENDING": "validating",
    "BATCH_STATE_RUNNING": "in_progress",
    "BATCH_STATE_SUCCEEDED": "completed",
    "BATCH_STATE_FAILED": "failed",
    "BATCH_STATE_EXPIRED": "expired",
    "BATCH_STATE_CANCELLED": "cancelled",
}
GOOGLE_STATUS: Final[dict[int, str]] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
MODELS: Final[tuple[str, ...]] = ("models/gemini-2.5-flash", "models/gemini-2.5-pro", "models/gemini-2.0-flash")
_TYPE: Final = "type.googleapis.com/google.ai.generativelanguage.v1main."
_FAILURES: Final[tuple[str, ...]] = (
    "Input file is not valid JSONL: line 3 is not a GenerateContentRequest.",
    "The model models/gemini-typo is not supported for batchGenerateContent.",
)
_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"


class GoogleError(SimRequestError):
    """A refusal in Google's shape: the canonical status name and `details` beside the message."""

    def __init__(
        self, status: int, message: str, *, google_status: str | None = None, details: list[Any] | None = None
    ) -> None:
        super().__init__(status, message, code=google_status or GOOGLE_STATUS.get(status, "UNKNOWN"))
        self.details = details or []


def timestamp(when: float) -> str:
    """Epoch seconds as Google writes a Timestamp: RFC 3339 UTC with nanoseconds."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds").replace("+00:00", "000Z")


@dataclass(kw_only=True)
class GeminiBatch(SimBatch):
    model: str
    display_name: str
    input_file: str | None
    #: The inline requests' metadata keys (None for a batch read from a file).
    keys: list[str] | None
    failure: str


class GeminiSim(SimApi):
    """The simulated Gemini batch API and its programmatic controls."""

    provider = "gemini"

    # -- state -------------------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Start cancelling, as `POST .../{id}:cancel` does (its answer is `{}`); a finished batch is refused."""
        record = self.book.get(batch_id)
        if record is None:
            raise self.not_found(batch_id)
        status = record.status_at(self.now())
        if status == "cancelling":
            return {}
        if status not in {"validating", "in_progress", "finalizing"}:
            raise GoogleError(400, "The batch has already finished.", google_status="FAILED_PRECONDITION")
        self.start_cancel(batch_id)
        return {}

    def common_status(self, batch_id: str) -> str:
        return COMMON[self.get(batch_id)["metadata"]["state"]]

    def page(self, *, page_size: int = DEFAULT_PAGE, token: str | None = None) -> dict[str, Any]:
        """One page of `GET /v1beta/batches`, newest first after the batch `token` names."""
        after = None
        if token:
            try:
                after = base64.urlsafe_b64decode(token.encode()).decode()
            except (binascii.Error, UnicodeDecodeError):
                after = ""
        found = self.book.before(after, page_size)
        if found is None:
            raise GoogleError(400, "Invalid page token.")
        records, more = found
        body: dict[str, Any] = {}
        if records:
            body["operations"] = [self.wire(r) for r in records]
        if more:
            body["nextPageToken"] = base64.urlsafe_b64encode(records[-1].id.encode()).decode()
        return body

    def _new_record(
        self,
        *,
        model: str | None = None,
        display_name: str | None = None,
        input_file: str | None = None,
        keys: list[str] | None = None,
        requests: int | None = None,
        created_at: float | None = None,
        outcome: Outcome | None = None,
    ) -> GeminiBatch:
        rng = self._rng
        t0 = self.now() if created_at is None else created_at
        drawn = draw_lifecycle(rng, self.profile, t0, WINDOW, outcome)
        if keys is not None:
            drawn["total"] = len(keys)
        elif requests is not None:
            if isinstance(requests, bool) or requests < 1:
                raise ValueError("requests must be a positive integer")
            drawn["total"] = requests
        seq = self._next_seq()
        name = "batches/" + "".join(self._ids.choices(_ID_ALPHABET, k=40))
        return GeminiBatch(
            id=name,
            seq=seq,
            metadata=None,
            model=model or rng.choice(MODELS),
            display_name=display_name or f"batch-{seq}",
            input_file=None if keys is not None else input_file or f"files/input-{seq}",
            keys=keys,
            failure=rng.choice(_FAILURES),
            **drawn,
        )

    # -- the wire form -----------------------------------------------------------------------------

    def wire(self, record: GeminiBatch) -> dict[str, Any]:
        """The batch's Operation as the API sends it now (fields at their default left out)."""
        now = self.now()
        status = record.status_at(now)
        state = WIRE_STATE[status_before_cancel(record) if status == "cancelling" else status]
        entered = [t for s in WIRE_STATE if (t := record.entered_at(s, now)) is not None and t <= now]
        meta: dict[str, Any] = {
            "@type": _TYPE + "GenerateContentBatch",
            "model": record.model,
            "displayName": record.display_name,
            "inputConfig": {"fileName": record.input_file} if record.input_file else {"requests": {}},
            "createTime": timestamp(record.t0),
            "updateTime": timestamp(max(entered, default=record.t0)),
            "batchStats": _stats(record, now, status),
            "state": state,
            "name": record.id,
        }
        op: dict[str, Any] = {"name": record.id, "metadata": meta}
        final = COMMON[state] in {"completed", "failed", "expired", "cancelled"}
        if final:
            ended = record.entered_at(COMMON[state], now)
            meta["endTime"] = timestamp(ended if ended is not None else now)
            op["done"] = True
        if state == "BATCH_STATE_SUCCEEDED":
            output = _output(record)
            meta["output"] = output
            op["response"] = {"@type": _TYPE + "GenerateContentBatchOutput", **output}
        elif state == "BATCH_STATE_FAILED":
            op["error"] = {"code": 3, "message": record.failure}
        return op

    def set_status(self, body: Any, status: str) -> None:
        for op in body.get("operations", [body]) if isinstance(body, dict) else body:
            op["metadata"]["state"] = status

    def set_created(self, body: Any, value: int) -> None:
        for op in body.get("operations", [body]) if isinstance(body, dict) else body:
            op["metadata"]["createTime"] = value

    # -- HTTP --------------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        root = f"/{API_VERSION}"
        app.router.add_post(
            root + "/models/{model:[^/:]+}:batchGenerateContent", self.endpoint("create", self._http_create)
        )
        app.router.add_get(root + "/batches", self.endpoint("list", self._http_list))
        app.router.add_post(root + "/batches/{batch_id:[^/:]+}:cancel", self.endpoint("cancel", self._http_cancel))
        app.router.add_get(root + "/batches/{batch_id:[^/:]+}", self.endpoint("retrieve", self._http_get))

    def authorize(self, request: web.Request) -> SimRequestError | None:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return GoogleError(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if key not in self.api_keys:
            info = {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
            return GoogleError(400, "API key not valid. Please pass a valid API key.", details=[info])
        return None

    def error_body(self, exc: SimRequestError) -> Any:
        error: dict[str, Any] = {
            "code": exc.status,
            "message": exc.message,
            "status": exc.code if isinstance(exc, GoogleError) else GOOGLE_STATUS.get(exc.status, "UNKNOWN"),
        }
        if isinstance(exc, GoogleError) and exc.details:
            error["details"] = exc.details
        return {"error": error}

    def not_found(self, batch_id: str) -> SimRequestError:
        del batch_id  # Google's message does not name it
        return GoogleError(404, "Requested entity was not found.")

    def _fault_response(self, fault: Fault) -> web.Response | None:
        match fault.kind:
            case "429":
                details: list[Any] = [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [{"quotaMetric": "generativelanguage.googleapis.com/batch_requests"}],
                    }
                ]
                if fault.retry_after is not None:
                    details.append(
                        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{fault.retry_after:g}s"}
                    )
                message = "You exceeded your current quota, please check your plan and billing details."
                return self.error_response(GoogleError(429, message, details=details))
            case "500":
                return self.error_response(GoogleError(500, "An internal error has occurred. Please retry."))
            case "503":
                headers = {} if fault.retry_after is None else {"Retry-After": str(math.ceil(fault.retry_after))}
                exc = GoogleError(503, "The model is overloaded. Please try again later.")
                return self.error_response(exc, headers)
        return super()._fault_response(fault)

    async def _http_create(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        batch = (await json_object(request)).get("batch")
        if not isinstance(batch, dict):
            raise GoogleError(400, "* BatchGenerateContentRequest.batch: batch is required")
        file_name, keys = _input_of(batch.get("inputConfig"))
        display = batch.get("displayName")
        return 200, self.create_batch(
            model="models/" + request.match_info["model"],
            display_name=display if isinstance(display, str) and display else None,
            input_file=file_name,
            keys=keys,
        )

    async def _http_get(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        batch_id = "batches/" + request.match_info["batch_id"]
        if batch_id not in self.book:
            raise self.not_found(batch_id)
        return 200, self.get(batch_id)

    async def _http_list(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        raw = request.query.get("pageSize", "0")
        try:
            size = int(raw)
        except ValueError:
            raise GoogleError(400, f"Invalid value at 'page_size' (TYPE_INT32), \"{raw}\"") from None
        if size < 0:
            raise GoogleError(400, "page_size must not be negative")
        size = DEFAULT_PAGE if size == 0 else min(size, MAX_PAGE)
        return 200, self.page(page_size=size, token=request.query.get("pageToken") or None)

    async def _http_cancel(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        return 200, self.cancel("batches/" + request.match_info["batch_id"])


def _input_of(config: Any) -> tuple[str | None, list[str] | None]:
    """A create's `inputConfig`: the input file's name, or the inline requests' keys; GoogleError if neither."""
    file_name = config.get("fileName") if isinstance(config, dict) else None
    inline = (config.get("requests") or {}).get("requests") if isinstance(config, dict) else None
    if (file_name is None) == (inline is None):
        raise GoogleError(400, "* GenerateContentBatch.input_config: one of file_name or requests is required")
    if file_name is not None:
        if not isinstance(file_name, str) or not file_name.startswith("files/"):
            raise GoogleError(400, f"* InputConfig.file_name: '{file_name}' is not a file name (files/...)")
        return file_name, None
    if not isinstance(inline, list) or not inline:
        raise GoogleError(400, "* InputConfig.requests: at least one request is required")
    meta = [(r.get("metadata") if isinstance(r, dict) else None) or {} for r in inline]
    return None, [str(m.get("key", i)) if isinstance(m, dict) else str(i) for i, m in enumerate(meta)]


def _stats(record: GeminiBatch, now: float, status: str) -> dict[str, str]:
    """`batchStats` now: every request, the finished ones (frozen by a cancel), the rest pending; zeros left out."""
    done = record.counts_at(now) if status != "failed" else {"completed": 0, "failed": 0}
    pending = record.total - done["completed"] - done["failed"]
    stats = {
        "requestCount": record.total,
        "successfulRequestCount": done["completed"],
        "failedRequestCount": done["failed"],
        "pendingRequestCount": pending if status in {"validating", "in_progress", "finalizing", "cancelling"} else 0,
    }
    return {k: str(v) for k, v in stats.items() if v}


def _output(record: GeminiBatch) -> dict[str, Any]:
    """Where a succeeded batch's results are: a responses file, or the inline responses."""
    if record.keys is None:
        return {"responsesFile": f"files/batch-{record.id.removeprefix('batches/')}"}
    failed = math.floor(len(record.keys) * record.failure_rate)
    responses = [
        {"error": {"code": 3, "message": "Request is invalid."}, "metadata": {"key": key}}
        if i < failed
        else {
            "response": {
                "candidates": [{"content": {"parts": [{"text": "OK"}], "role": "model"}, "finishReason": "STOP"}],
                "modelVersion": record.model.removeprefix("models/"),
            },
            "metadata": {"key": key},
        }
        for i, key in enumerate(record.keys)
    ]
    return {"inlinedResponses": {"inlinedResponses": responses}}
