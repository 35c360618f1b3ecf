"""A simulated Together batch API, wire-compatible with the official `together` SDK (`client.batches`):
create (answering `{job, warning}`), retrieve, list (one unpaged array, newest first) and cancel, under
`/v1/batches`.

Timestamps are RFC 3339 strings; unset ones are null. There are no request counts, only `progress` (0-100).
Together has no finalizing or cancelling status: the shared lifecycle's finalizing shows as IN_PROGRESS, and
a batch being cancelled keeps the status it had until it is CANCELLED. Errors are OpenAI-shaped
(`{"error": {"message", "type", "param", "code"}}`). A 429 fault sends Together's `x-ratelimit-remaining: 0`
and `x-ratelimit-reset` (seconds), and a Retry-After only when the fault sets `retry_after`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from poller.sim._draw import draw_lifecycle, new_uuid, rfc3339, status_before_cancel
from poller.sim.base import DEFAULT_KEY, SimApi, SimRequestError, json_object
from poller.sim.clock import Clock
from poller.sim.faults import Fault
from poller.sim.lifecycle import Outcome, SimBatch, SimProfile

#: The common lifecycle -> Together's statuses (cancelling is resolved to the status before the cancel).
WIRE_STATUS: Final[dict[str, str]] = {
    "validating": "VALIDATING",
    "in_progress": "IN_PROGRESS",
    "finalizing": "IN_PROGRESS",
    "completed": "COMPLETED",
    "failed": "FAILED",
    "expired": "EXPIRED",
    "cancelled": "CANCELLED",
}
ENDPOINTS: Final[tuple[str, ...]] = ("/v1/chat/completions", "/v1/audio/transcriptions", "/v1/audio/translations")
MODELS: Final[tuple[str, ...]] = ("meta-llama/Llama-3.3-70B-Instruct-Turbo", "Qwen/Qwen2.5-72B-Instruct-Turbo")
#: Together's completion window: a job not done within it expires.
WINDOW: Final = 86_400
_FINISHED: Final = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(kw_only=True)
class TogetherJob(SimBatch):
    endpoint: str
    model_id: str
    input_file_id: str
    output_file_id: str
    error_file_id: str
    file_size_bytes: int
    user_id: str


class TogetherSim(SimApi):
    """The simulated Together batch API; `base_path` is empty, like the SDK's `base_url`."""

    provider = "together"
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
        """Cancel a job, as `POST /v1/batches/{id}/cancel` does; SimRequestError if not allowed."""
        record = self.start_cancel(batch_id)
        assert isinstance(record, TogetherJob)
        return self.wire(record)

    def all_jobs(self) -> list[dict[str, Any]]:
        """`GET /v1/batches`: every job, newest first."""
        return [self.wire(r) for r in self.book.newest_first()]

    def _new_record(
        self,
        *,
        endpoint: str = "/v1/chat/completions",
        model_id: str | None = None,
        input_file_id: str | None = None,
        created_at: float | None = None,
        outcome: Outcome | None = None,
    ) -> TogetherJob:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        rng, taken = self._rng, self.book.by_id
        t0 = self.now() if created_at is None else created_at
        drawn = draw_lifecycle(rng, self.profile, t0, WINDOW, outcome)
        return TogetherJob(
            id=new_uuid(self._ids, taken),
            seq=self._next_seq(),
            metadata=None,
            endpoint=endpoint,
            model_id=model_id or rng.choice(MODELS),
            input_file_id=input_file_id or f"file-{new_uuid(self._ids, taken)}",
            output_file_id=f"file-{new_uuid(self._ids, taken)}",
            error_file_id=f"file-{new_uuid(self._ids, taken)}",
            file_size_bytes=drawn["total"] * rng.randint(200, 4_000),
            user_id=new_uuid(self._ids, taken).replace("-", "")[:24],
            **drawn,
        )

    # -- the wire form -----------------------------------------------------------------------------

    def wire(self, record: TogetherJob) -> dict[str, Any]:
        """The job as the API sends it now."""
        now = self.now()
        common = record.status_at(now)
        shown = status_before_cancel(record) if common == "cancelling" else common
        counts = record.counts_at(now)
        ended = record.entered_at(common, now) if common in _FINISHED else None
        done = counts["completed"] + counts["failed"]
        return {
            "id": record.id,
            "user_id": record.user_id,
            "input_file_id": record.input_file_id,
            "file_size_bytes": record.file_size_bytes,
            "status": WIRE_STATUS[shown],
            "job_deadline": rfc3339(record.deadline),
            "created_at": rfc3339(record.t0),
            "endpoint": record.endpoint,
            "progress": round(100.0 * done / counts["total"], 2) if counts["total"] else 0.0,
            "model_id": record.model_id,
            "output_file_id": record.output_file_id if common in _FINISHED and counts["completed"] else None,
            "error_file_id": record.error_file_id if common in _FINISHED and counts["failed"] else None,
            "error": "input file failed validation" if common == "failed" else None,
            "completed_at": None if ended is None else rfc3339(ended),
        }

    def set_created(self, body: Any, value: int) -> None:
        for job in body if isinstance(body, list) else [body.get("job", body)]:
            job["created_at"] = value

    # -- HTTP --------------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/batches", self.endpoint("create", self._http_create))
        app.router.add_get("/v1/batches", self.endpoint("list", self._http_list))
        app.router.add_get("/v1/batches/{batch_id}", self.endpoint("retrieve", self._http_get))
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.endpoint("cancel", self._http_cancel))

    def authorize(self, request: web.Request) -> SimRequestError | None:
        header = request.headers.get("Authorization", "")
        return self._check_key(header[7:].strip() if header[:7].lower() == "bearer " else None)

    def not_found(self, batch_id: str) -> SimRequestError:
        return SimRequestError(404, f"batch job {batch_id} not found", code="not_found")

    def _fault_response(self, fault: Fault) -> web.Response | None:
        if fault.kind != "429":
            return super()._fault_response(fault)
        wait = 1.0 if fault.retry_after is None else fault.retry_after
        headers = {"x-ratelimit-limit": "10", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(math.ceil(wait))}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(fault.retry_after))
        exc = SimRequestError(429, "Rate limit exceeded, please try again later.", type_="rate_limit_exceeded")
        return self.error_response(exc, headers)

    async def _http_create(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        body = await json_object(request)
        for name in ("endpoint", "input_file_id"):
            if not isinstance(body.get(name), str) or not body[name]:
                raise SimRequestError(400, f"Missing required parameter: '{name}'.", param=name)
        if body["endpoint"] not in ENDPOINTS:
            raise SimRequestError(400, f"Invalid endpoint: '{body['endpoint']}'.", param="endpoint")
        job = self.create_batch(
            endpoint=body["endpoint"], input_file_id=body["input_file_id"], model_id=body.get("model_id")
        )
        return 200, {"job": job, "warning": None}

    async def _http_list(self, _: web.Request) -> tuple[int, list[dict[str, Any]]]:
        return 200, self.all_jobs()

    async def _http_cancel(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        return 200, self.cancel(request.match_info["batch_id"])
