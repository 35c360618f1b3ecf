"""A simulated Anthropic Message Batches API, wire-compatible with the official `anthropic` SDK
(`client.messages.batches`): create, retrieve, list (newest first, `after_id` / `before_id` cursors, up to
1,000 a page) and cancel, under `/v1/messages/batches`.

The shared lifecycle shows through Anthropic's three statuses: validating, in_progress and finalizing are
all `in_progress`, cancelling is `canceling`, and every end is `ended` with `ended_at`. No counter moves
before the end (`processing` holds every request); then they tell succeeded, errored, canceled (a cancel)
and expired (the 24 hours ran out) requests. Anthropic batches do not fail as a whole: the shared
lifecycle's failed outcome ends with every request errored. Times are RFC 3339 strings with microseconds.

Keys are accepted in `x-api-key` (as the docs show) or `Authorization: Bearer` (as the SDK sends it), with
an `anthropic-version` header. Errors are `{"type": "error", "error": {"type", "message"}}`, responses carry
`request-id`. A 429 fault sends `anthropic-ratelimit-requests-*` headers (the reset as an RFC 3339 time)
and a `retry-after` only when the fault sets `retry_after`; the 503 fault answers Anthropic's 529 overloaded.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from poller.sim._draw import draw_lifecycle
from poller.sim.base import DEFAULT_KEY, SimApi, SimRequestError, json_object
from poller.sim.clock import Clock
from poller.sim.faults import Fault
from poller.sim.lifecycle import Outcome, SimBatch, SimProfile, new_id

WINDOW: Final = 86_400
MAX_REQUESTS: Final = 100_000
#: The common lifecycle -> Anthropic's `processing_status`.
WIRE_STATUS: Final[dict[str, str]] = {
    "validating": "in_progress",
    "in_progress": "in_progress",
    "finalizing": "in_progress",
    "cancelling": "canceling",
    "completed": "ended",
    "failed": "ended",
    "expired": "ended",
    "cancelled": "ended",
}
#: Anthropic's error types by HTTP status.
ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_CUSTOM_ID: Final = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def rfc3339(when: float) -> str:
    """Epoch seconds as Anthropic writes times: RFC 3339 UTC with microseconds."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class AnthropicSim(SimApi):
    """The simulated Message Batches API and its programmatic controls."""

    provider = "anthropic"

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        profile: SimProfile | None = None,
        seed: int = 0,
        api_keys: Sequence[str] = (DEFAULT_KEY,),
    ) -> None:
        super().__init__(clock=clock, profile=profile, seed=seed, api_keys=tuple(api_keys))
        #: Where `results_url` points: the origin the last request came to.
        self.origin = "http://127.0.0.1"

    # -- state -------------------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Start cancelling, as `POST .../{id}/cancel` does: a canceling batch stays so, an ended one is refused."""
        record = self.book.get(batch_id)
        if record is None:
            raise self.not_found(batch_id)
        status = record.status_at(self.now())
        if status == "cancelling":
            return self.wire(record)
        if WIRE_STATUS[status] == "ended":
            raise SimRequestError(400, f"Batch '{batch_id}' cannot be canceled: it has already ended.")
        return self.wire(self.start_cancel(batch_id))

    def common_status(self, batch_id: str) -> str:
        """What an Anthropic batch resolves to: `ended` by its counts and `cancel_initiated_at`."""
        body = self.get(batch_id)
        match body["processing_status"]:
            case "in_progress":
                return "in_progress"
            case "canceling":
                return "cancelling"
        if body["cancel_initiated_at"] is not None:
            return "cancelled"
        return "expired" if body["request_counts"]["expired"] else "completed"

    def page(self, *, limit: int = 20, after_id: str | None = None, before_id: str | None = None) -> dict[str, Any]:
        """One page of `GET /v1/messages/batches`, newest first, older than `after_id` or newer than `before_id`."""
        if before_id is not None:
            ordered = self.book.newest_first()
            anchor = next((i for i, r in enumerate(ordered) if r.id == before_id), None)
            if anchor is None:
                raise SimRequestError(400, f"before_id: no batch '{before_id}'.")
            start = max(0, anchor - limit)
            records, has_more = ordered[start:anchor], start > 0
        else:
            found = self.book.before(after_id, limit)
            if found is None:
                raise SimRequestError(400, f"after_id: no batch '{after_id}'.")
            records, has_more = found
        data = [self.wire(r) for r in records]
        return {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    def _new_record(
        self, *, requests: int | None = None, created_at: float | None = None, outcome: Outcome | None = None
    ) -> SimBatch:
        if requests is not None and (isinstance(requests, bool) or not 1 <= requests <= MAX_REQUESTS):
            raise ValueError(f"requests must be between 1 and {MAX_REQUESTS}")
        t0 = self.now() if created_at is None else created_at
        drawn = draw_lifecycle(self._rng, self.profile, t0, WINDOW, outcome)
        if requests is not None:
            drawn["total"] = requests
        if drawn["outcome"] == "failed":  # a batch does not fail as a whole: every request errors instead
            drawn |= {"outcome": "completed", "failure_rate": 1.0}
        return SimBatch(
            id=new_id(self._ids, "msgbatch_01", 22, self.book.by_id), seq=self._next_seq(), metadata=None, **drawn
        )

    # -- the wire form -----------------------------------------------------------------------------

    def wire(self, record: SimBatch) -> dict[str, Any]:
        """The batch as the API sends it now (its nullable fields as null)."""
        now = self.now()
        status = record.status_at(now)
        wire_status = WIRE_STATUS[status]
        counts = {"processing": record.total, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        ended_at = None
        if wire_status == "ended":
            done = record.counts_at(now)  # frozen at the cancel
            left = record.total - done["completed"] - done["failed"]
            counts = {
                "processing": 0,
                "succeeded": done["completed"],
                "errored": done["failed"],
                "canceled": left if status == "cancelled" else 0,
                "expired": left if status == "expired" else 0,
            }
            ended_at = record.entered_at(status, now)
        cancel_at = record.t_cancel if record.t_cancel is not None and now >= record.t_cancel else None
        return {
            "id": record.id,
            "type": "message_batch",
            "processing_status": wire_status,
            "request_counts": counts,
            "ended_at": None if ended_at is None else rfc3339(ended_at),
            "created_at": rfc3339(record.t0),
            "expires_at": rfc3339(record.t0 + WINDOW),
            "archived_at": None,
            "cancel_initiated_at": None if cancel_at is None else rfc3339(cancel_at),
            "results_url": f"{self.origin}/v1/messages/batches/{record.id}/results" if ended_at is not None else None,
        }

    def set_status(self, body: Any, status: str) -> None:
        for batch in body.get("data", [body]) if isinstance(body, dict) else body:
            batch["processing_status"] = status

    # -- HTTP --------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = super().app()
        app.on_response_prepare.append(_stamp_request_id)
        return app

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages/batches", self.endpoint("create", self._http_create))
        app.router.add_get("/v1/messages/batches", self.endpoint("list", self._http_list))
        app.router.add_get("/v1/messages/batches/{batch_id}", self.endpoint("retrieve", self._http_get))
        app.router.add_post("/v1/messages/batches/{batch_id}/cancel", self.endpoint("cancel", self._http_cancel))

    def authorize(self, request: web.Request) -> SimRequestError | None:
        header = request.headers.get("Authorization", "")
        key = request.headers.get("x-api-key") or (header[7:].strip() if header[:7].lower() == "bearer " else None)
        if not key:
            return SimRequestError(401, "x-api-key header is required", type_="authentication_error")
        if key not in self.api_keys:
            return SimRequestError(401, "invalid x-api-key", type_="authentication_error")
        if not request.headers.get("anthropic-version"):
            return SimRequestError(400, "anthropic-version: header is required")
        self.origin = str(request.url.origin())
        return None

    def error_body(self, exc: SimRequestError) -> Any:
        kind = exc.type if exc.type in ERROR_TYPES.values() else ERROR_TYPES.get(exc.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": exc.message}, "request_id": _request_id()}

    def not_found(self, batch_id: str) -> SimRequestError:
        return SimRequestError(404, f"No batch found with id '{batch_id}'.", type_="not_found_error")

    def _fault_response(self, fault: Fault) -> web.Response | None:
        if fault.kind == "503":
            headers = {} if fault.retry_after is None else {"retry-after": str(math.ceil(fault.retry_after))}
            return self.error_response(SimRequestError(529, "Overloaded", type_="overloaded_error"), headers)
        if fault.kind != "429":
            return super()._fault_response(fault)
        wait = 1.0 if fault.retry_after is None else fault.retry_after
        headers = {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            # Rate limits run on the client's clock, not the simulated one.
            "anthropic-ratelimit-requests-reset": rfc3339(math.ceil(time.time() + wait)),
        }
        if fault.retry_after is not None:
            headers["retry-after"] = str(math.ceil(fault.retry_after))
        message = "Number of request tokens has exceeded your per-minute rate limit."
        return self.error_response(SimRequestError(429, message, type_="rate_limit_error"), headers)

    async def _http_create(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        body = await json_object(request)
        return 200, self.create_batch(requests=_validate_requests(body.get("requests")))

    async def _http_list(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        query = request.query
        raw = query.get("limit", "20")
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            raise SimRequestError(400, f"limit: Input should be between 1 and 1000, got '{raw}'.")
        after_id, before_id = query.get("after_id") or None, query.get("before_id") or None
        if after_id and before_id:
            raise SimRequestError(400, "Only one of after_id and before_id may be given.")
        return 200, self.page(limit=limit, after_id=after_id, before_id=before_id)

    async def _http_cancel(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        return 200, self.cancel(request.match_info["batch_id"])


def _validate_requests(requests: Any) -> int:
    """Check a create body's `requests` as the API does; how many there are."""
    if not isinstance(requests, list) or not requests:
        raise SimRequestError(400, "requests: Field required and must be a non-empty list.")
    if len(requests) > MAX_REQUESTS:
        raise SimRequestError(400, f"requests: at most {MAX_REQUESTS} requests per batch.")
    seen: set[str] = set()
    for i, item in enumerate(requests):
        custom_id = _validate_request(i, item)
        if custom_id in seen:
            raise SimRequestError(400, f"requests.{i}.custom_id: '{custom_id}' is not unique in the batch.")
        seen.add(custom_id)
    return len(requests)


def _validate_request(i: int, item: Any) -> str:
    """Check one request of a batch; its `custom_id`."""
    if not isinstance(item, dict):
        raise SimRequestError(400, f"requests.{i}: Input should be an object.")
    custom_id, params = item.get("custom_id"), item.get("params")
    if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
        raise SimRequestError(400, f"requests.{i}.custom_id: String should match pattern '{_CUSTOM_ID.pattern}'.")
    if not isinstance(params, dict):
        raise SimRequestError(400, f"requests.{i}.params: Field required.")
    for name in ("model", "max_tokens", "messages"):
        if name not in params:
            raise SimRequestError(400, f"requests.{i}.params.{name}: Field required.")
    tokens = params["max_tokens"]
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise SimRequestError(400, f"requests.{i}.params.max_tokens: Input should be a positive integer.")
    if not isinstance(params["messages"], list) or not params["messages"]:
        raise SimRequestError(400, f"requests.{i}.params.messages: at least one message is required.")
    return custom_id


def _request_id() -> str:
    return f"req_011C{uuid.uuid4().hex[:20]}"


async def _stamp_request_id(_: web.Request, response: web.StreamResponse) -> None:
    """Anthropic's `request-id` header on every response, errors included."""
    response.headers.setdefault("request-id", _request_id())
