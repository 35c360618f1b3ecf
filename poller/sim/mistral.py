"""A simulated Mistral batch jobs API, wire-compatible with the official `mistralai` SDK (`client.batch.jobs`):
create, get, list (offset pages with a `total`, newest first by default) and cancel, under `/v1/batch/jobs`.

Errors are Mistral's `{"object": "error", "message", "type", "param", "code"}`; a missing or wrong key gets
the gateway's `{"message": "Unauthorized"}` and query validation FastAPI's 422 `{"detail": [...]}`. A 429
fault sends Mistral's per-minute headers (`x-ratelimit-remaining-req-minute: 0`) and a Retry-After only
when the fault sets `retry_after`. The finalizing phase of the shared lifecycle shows as RUNNING.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from poller.sim._draw import draw_lifecycle, new_uuid
from poller.sim.base import DEFAULT_KEY, SimApi, SimRequestError, json_object
from poller.sim.clock import Clock
from poller.sim.faults import Fault
from poller.sim.lifecycle import Outcome, SimBatch, SimProfile

#: The common lifecycle -> Mistral's statuses.
WIRE_STATUS: Final[dict[str, str]] = {
    "validating": "QUEUED",
    "in_progress": "RUNNING",
    "finalizing": "RUNNING",
    "completed": "SUCCESS",
    "failed": "FAILED",
    "expired": "TIMEOUT_EXCEEDED",
    "cancelling": "CANCELLATION_REQUESTED",
    "cancelled": "CANCELLED",
}
STATUSES: Final = frozenset(WIRE_STATUS.values())
ENDPOINTS: Final[tuple[str, ...]] = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/fim/completions",
    "/v1/moderations",
    "/v1/chat/moderations",
    "/v1/ocr",
    "/v1/classifications",
    "/v1/chat/classifications",
    "/v1/conversations",
    "/v1/audio/transcriptions",
)
MODELS: Final[tuple[str, ...]] = ("mistral-small-latest", "mistral-large-latest", "ministral-8b-latest")
_FAILURES: Final[tuple[str, ...]] = (
    "Invalid JSON on line 1 of the input file.",
    "Model 'mistral-typo' is not available for batch inference.",
)
_FINISHED: Final = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(kw_only=True)
class MistralJob(SimBatch):
    endpoint: str
    model: str | None
    agent_id: str | None
    input_files: list[str]
    output_file: str
    error_file: str
    failure: str


class MistralSim(SimApi):
    """The simulated Mistral batch jobs API; `base_path` is empty, like the SDK's `server_url`."""

    provider = "mistral"
    base_path = ""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        profile: SimProfile | None = None,
        seed: int = 0,
        api_keys: Sequence[str] = (DEFAULT_KEY,),
    ) -> None:
        super().__init__(clock=clock, profile=profile, seed=seed, api_keys=tuple(api_keys))

    # -- state -------------------------------------------------------------------------------------

    def create_batch(self, **fields: Any) -> dict[str, Any]:
        """Create one job (fields as for `create_batches`) and return its wire form."""
        record = self._new_record(**fields)
        self.book.add([record])
        return self.wire(record)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Request cancellation, as `POST /v1/batch/jobs/{id}/cancel` does; SimRequestError if not allowed."""
        record = self.start_cancel(batch_id)
        assert isinstance(record, MistralJob)
        return self.wire(record)

    def page(
        self,
        *,
        page: int = 0,
        page_size: int = 100,
        order_by: str = "-created",
        statuses: Sequence[str] = (),
        created_after: float | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """One page of `GET /v1/batch/jobs`: the jobs that match, `page_size` from `page * page_size`."""
        records = self.book.newest_first() if order_by == "-created" else self.book.oldest_first()
        now = self.now()
        matching = [
            r
            for r in records
            if (not statuses or WIRE_STATUS[r.status_at(now)] in statuses)
            and (created_after is None or r.created_at > created_after)
            and (model is None or r.model == model)
        ]
        start = page * page_size
        return {
            "object": "list",
            "data": [self.wire(r) for r in matching[start : start + page_size]],
            "total": len(matching),
        }

    def _new_record(
        self,
        *,
        endpoint: str = "/v1/chat/completions",
        model: str | None = None,
        agent_id: str | None = None,
        input_files: list[str] | None = None,
        metadata: dict[str, str] | None = None,
        timeout_hours: int = 24,
        created_at: float | None = None,
        outcome: Outcome | None = None,
    ) -> MistralJob:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if isinstance(timeout_hours, bool) or not isinstance(timeout_hours, int) or timeout_hours < 1:
            raise ValueError("timeout_hours must be a positive integer")
        rng, taken = self._rng, self.book.by_id
        t0 = self.now() if created_at is None else created_at
        drawn = draw_lifecycle(rng, self.profile, t0, timeout_hours * 3600, outcome)
        return MistralJob(
            id=new_uuid(self._ids, taken),
            seq=self._next_seq(),
            metadata=dict(metadata) if metadata is not None else None,
            endpoint=endpoint,
            model=model if model is not None or agent_id is not None else rng.choice(MODELS),
            agent_id=agent_id,
            input_files=list(input_files) if input_files else [new_uuid(self._ids, taken)],
            output_file=new_uuid(self._ids, taken),
            error_file=new_uuid(self._ids, taken),
            failure=rng.choice(_FAILURES),
            **drawn,
        )

    # -- the wire form -----------------------------------------------------------------------------

    def wire(self, record: MistralJob) -> dict[str, Any]:
        """The job as the API sends it now (Mistral sends its nullable fields as null)."""
        now = self.now()
        status = record.status_at(now)
        counts = record.counts_at(now)
        started = record.entered_at("in_progress", now)
        ended = record.entered_at(status, now) if status in _FINISHED else None
        return {
            "id": record.id,
            "object": "batch",
            "input_files": record.input_files,
            "metadata": record.metadata,
            "endpoint": record.endpoint,
            "model": record.model,
            "agent_id": record.agent_id,
            "output_file": record.output_file if status in _FINISHED and counts["completed"] else None,
            "error_file": record.error_file if status in _FINISHED and counts["failed"] else None,
            "errors": [{"message": record.failure, "count": 1}] if status == "failed" else [],
            "outputs": None,
            "status": WIRE_STATUS[status],
            "created_at": record.created_at,
            "total_requests": counts["total"],
            "completed_requests": counts["completed"] + counts["failed"],
            "succeeded_requests": counts["completed"],
            "failed_requests": counts["failed"],
            "started_at": None if started is None else math.floor(started),
            "completed_at": None if ended is None else math.floor(ended),
        }

    # -- HTTP --------------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/batch/jobs", self.endpoint("create", self._http_create))
        app.router.add_get("/v1/batch/jobs", self.endpoint("list", self._http_list))
        app.router.add_get("/v1/batch/jobs/{job_id}", self.endpoint("retrieve", self._http_get))
        app.router.add_post("/v1/batch/jobs/{job_id}/cancel", self.endpoint("cancel", self._http_cancel))

    def authorize(self, request: web.Request) -> SimRequestError | None:
        header = request.headers.get("Authorization", "")
        return self._check_key(header[7:].strip() if header[:7].lower() == "bearer " else None)

    def error_body(self, exc: SimRequestError) -> Any:
        if exc.status == 401:
            return {"message": "Unauthorized", "request_id": uuid.uuid4().hex}
        if exc.status == 422:
            return {"detail": [{"type": exc.code or "value_error", "loc": ["query", exc.param], "msg": exc.message}]}
        return {"object": "error", "message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}

    def not_found(self, batch_id: str) -> SimRequestError:
        return SimRequestError(404, f"Batch job {batch_id} not found", type_="invalid_request_error")

    def _fault_response(self, fault: Fault) -> web.Response | None:
        if fault.kind != "429":
            return super()._fault_response(fault)
        headers = {"x-ratelimit-limit-req-minute": "60", "x-ratelimit-remaining-req-minute": "0"}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(fault.retry_after))
        return self.error_response(
            SimRequestError(429, "Rate limit exceeded", code="1300", type_="rate_limited"), headers
        )

    async def _http_create(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        body = await json_object(request)
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise SimRequestError(400, f"Invalid endpoint: {endpoint!r}.", param="endpoint")
        if not body.get("input_files") and not body.get("requests"):
            raise SimRequestError(400, "Either input_files or requests must be given.", param="input_files")
        if body.get("model") is None and body.get("agent_id") is None:
            raise SimRequestError(400, "Either model or agent_id must be given.", param="model")
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise SimRequestError(400, "metadata must map strings to strings.", param="metadata")
        try:
            job = self.create_batch(
                endpoint=endpoint,
                model=body.get("model"),
                agent_id=body.get("agent_id"),
                input_files=body.get("input_files") or None,
                metadata=metadata,
                timeout_hours=body.get("timeout_hours", 24),
            )
        except ValueError as exc:
            raise SimRequestError(400, str(exc), param="timeout_hours") from None
        return 200, job

    async def _http_get(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        job_id = request.match_info["job_id"]
        if job_id not in self.book:
            raise self.not_found(job_id)
        return 200, self.get(job_id)

    async def _http_list(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        query = request.query
        statuses = query.getall("status", [])
        unknown = [s for s in statuses if s not in STATUSES]
        if unknown:
            raise SimRequestError(422, f"Input should be one of {', '.join(sorted(STATUSES))}", param="status")
        order_by = query.get("order_by", "-created")
        if order_by not in {"created", "-created"}:
            raise SimRequestError(422, "Input should be 'created' or '-created'", param="order_by")
        created_after = None
        if query.get("created_after"):
            try:
                when = datetime.fromisoformat(query["created_after"])
            except ValueError:
                raise SimRequestError(422, "Input should be a valid datetime", param="created_after") from None
            created_after = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        return 200, self.page(
            page=_int_query(query.get("page", "0"), "page", 0),
            page_size=_int_query(query.get("page_size", "100"), "page_size", 1),
            order_by=order_by,
            statuses=statuses,
            created_after=created_after,
            model=query.get("model") or None,
        )

    async def _http_cancel(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        return 200, self.cancel(request.match_info["job_id"])


def _int_query(raw: str, name: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SimRequestError(422, "Input should be a valid integer", param=name, code="int_parsing") from None
    if value < minimum:
        raise SimRequestError(422, f"Input should be greater than or equal to {minimum}", param=name)
    return value
