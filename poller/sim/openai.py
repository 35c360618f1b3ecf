"""A simulated OpenAI Batch API (also Azure OpenAI's, under its route prefixes), wire-compatible with the
official `openai` SDK: create, retrieve, list (cursor pages, newest first) and cancel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from poller.sim.base import DEFAULT_KEY, SimApi, SimRequestError, json_object
from poller.sim.clock import Clock
from poller.sim.lifecycle import Outcome, SimBatch, SimProfile, new_id, plan_phases

ENDPOINTS: Final[tuple[str, ...]] = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
)
COMPLETION_WINDOWS: Final[dict[str, int]] = {"24h": 86_400}
_META_MAX_KEYS: Final = 16
_META_MAX_KEY_LEN: Final = 64
_META_MAX_VALUE_LEN: Final = 512
_OUTPUT_EXPIRY_RANGE: Final = (3600, 2_592_000)

_VALIDATION_ERRORS: Final[tuple[tuple[str, str, bool], ...]] = (
    ("invalid_json_line", "This line is not parseable as valid JSON.", True),
    ("missing_required_parameter", "Missing required parameter: 'model'.", True),
    ("model_not_found", "The provided model 'gpt-4o-typo' is not supported by the Batch API.", True),
    (
        "token_limit_exceeded",
        (
            "Enqueued token limit reached for gpt-4o-mini in organization org-sim. Limit: 2,000,000 "
            "enqueued tokens. Please try again once some in_progress batches have been completed."
        ),
        False,
    ),
)


@dataclass(kw_only=True)
class OpenAIBatch(SimBatch):
    endpoint: str
    input_file_id: str
    completion_window: str
    model: str
    tokens_in: int
    tokens_out: int
    cached_share: float
    output_file_id: str
    error_file_id: str
    errors: list[dict[str, Any]]


class OpenAISim(SimApi):
    """The simulated OpenAI Batch API, its HTTP routes under every prefix, and programmatic controls.

    `stamps=False` imitates compatible servers (Llama Stack) that never set `in_progress_at` and never
    enter `finalizing`.
    """

    provider = "openai"

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        profile: SimProfile | None = None,
        seed: int = 0,
        api_keys: Sequence[str] = (DEFAULT_KEY,),
        prefixes: Sequence[str] = ("/v1",),
        stamps: bool = True,
    ) -> None:
        super().__init__(clock=clock, profile=profile, seed=seed, api_keys=tuple(api_keys))
        self.prefixes = tuple("/" + p.strip("/") for p in prefixes)
        if not self.prefixes:
            raise ValueError("at least one route prefix is needed")
        self.base_path = self.prefixes[0]
        self.stamps = stamps

    # -- state -------------------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Start cancelling a batch, as `POST /batches/{id}/cancel` does; SimRequestError if not allowed."""
        record = self.start_cancel(batch_id)
        assert isinstance(record, OpenAIBatch)
        return self.wire(record)

    def page(self, *, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """One page of the list, newest first, as `GET /batches` answers it."""
        found = self.book.before(after, limit)
        if found is None:
            raise SimRequestError(400, f"No batch found with id '{after}'.", param="after")
        records, has_more = found
        data = [self.wire(r) for r in records]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }

    def _new_record(
        self,
        *,
        input_file_id: str | None = None,
        endpoint: str = "/v1/chat/completions",
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        created_at: float | None = None,
        outcome: Outcome | None = None,
    ) -> OpenAIBatch:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if completion_window not in COMPLETION_WINDOWS:
            raise ValueError(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}")
        rng, p = self._rng, self.profile
        t0 = self.now() if created_at is None else created_at
        window = COMPLETION_WINDOWS[completion_window]
        phases = plan_phases(rng, p, t0, window, outcome)
        code, message, has_line = rng.choice(_VALIDATION_ERRORS)
        total = rng.randint(*p.requests)
        models = p.models.get(endpoint) or p.models.get("*") or ("gpt-4o-mini",)
        taken = self.book.by_id
        return OpenAIBatch(
            id=new_id(self._ids, "batch_", 32, taken),
            seq=self._next_seq(),
            t0=t0,
            created_at=math.floor(t0),
            deadline=math.floor(t0) + window,
            endpoint=endpoint,
            input_file_id=input_file_id or new_id(self._ids, "file-", 22, taken),
            completion_window=completion_window,
            metadata=dict(metadata) if metadata is not None else None,
            outcome=phases.outcome,
            t_in_progress=phases.t_in_progress,
            t_finalizing=phases.t_finalizing,
            t_end=phases.t_end,
            total=total,
            failure_rate=rng.uniform(*p.request_failure_rate),
            expired_progress=rng.uniform(*p.expired_progress),
            cancelling_s=rng.uniform(*p.cancelling_s),
            model=rng.choice(models),
            tokens_in=rng.randint(*p.tokens_in_per_request),
            tokens_out=rng.randint(*p.tokens_out_per_request),
            cached_share=rng.uniform(0.0, 0.5),
            output_file_id=new_id(self._ids, "file-", 22, taken),
            error_file_id=new_id(self._ids, "file-", 22, taken),
            errors=[
                {"code": code, "line": rng.randint(1, total) if has_line else None, "message": message, "param": None}
            ],
        )

    # -- the wire form -----------------------------------------------------------------------------

    def wire(self, record: OpenAIBatch) -> dict[str, Any]:
        """The batch as the API sends it now, with unset fields as null like the real API."""
        now = self.now()
        status = record.status_at(now)
        if not self.stamps and status == "finalizing":
            status = "in_progress"  # a server without a finalizing phase reports in_progress until the end
        counts = record.counts_at(now)
        body: dict[str, Any] = {
            "id": record.id,
            "object": "batch",
            "endpoint": record.endpoint,
            "errors": None,
            "input_file_id": record.input_file_id,
            "completion_window": record.completion_window,
            "status": status,
            "output_file_id": None,
            "error_file_id": None,
            "created_at": record.created_at,
            "in_progress_at": None,
            "expires_at": record.deadline,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": counts,
            "metadata": record.metadata,
            "model": None,
            "usage": None,
        }
        for stamped in ("in_progress", "finalizing", "cancelling", "completed", "failed", "expired", "cancelled"):
            if not self.stamps and stamped in {"in_progress", "finalizing"}:
                continue
            when = record.entered_at(stamped, now)
            if when is not None:
                body[f"{stamped}_at"] = math.floor(when)
        match status:
            case "failed":
                body["errors"] = {"object": "list", "data": record.errors}
            case "expired" | "cancelled":
                _attach_files(record, body, counts)
            case "completed":
                _attach_files(record, body, counts)
                body["model"] = record.model
                body["usage"] = _usage(record, counts)
        return body

    # -- HTTP --------------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        for prefix in self.prefixes:
            app.router.add_post(f"{prefix}/batches", self.endpoint("create", self._http_create))
            app.router.add_get(f"{prefix}/batches", self.endpoint("list", self._http_list))
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", self.endpoint("retrieve", self._http_get))
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", self.endpoint("cancel", self._http_cancel))

    def authorize(self, request: web.Request) -> SimRequestError | None:
        refused = super().authorize(request)
        if refused is not None and refused.code is None:
            refused.message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            refused.type = "invalid_request_error"
        elif refused is not None:
            refused.type = "invalid_request_error"
        return refused

    async def _http_create(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        body = await json_object(request)
        return 200, self.create_batch(**_validate_create(body))

    async def _http_list(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        raw = request.query.get("limit", "20")
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise SimRequestError(
                400,
                f"Invalid 'limit': integer must be between 1 and 100, got '{raw}'.",
                param="limit",
                code="integer_out_of_range",
            )
        return 200, self.page(limit=limit, after=request.query.get("after") or None)

    async def _http_cancel(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        return 200, self.cancel(request.match_info["batch_id"])


def _attach_files(record: OpenAIBatch, body: dict[str, Any], counts: dict[str, int]) -> None:
    if counts["completed"]:
        body["output_file_id"] = record.output_file_id
    if counts["failed"]:
        body["error_file_id"] = record.error_file_id


def _usage(record: OpenAIBatch, counts: dict[str, int]) -> dict[str, Any]:
    answered = counts["completed"]
    tokens_in = answered * record.tokens_in
    tokens_out = 0 if record.endpoint == "/v1/embeddings" else answered * record.tokens_out
    return {
        "input_tokens": tokens_in,
        "input_tokens_details": {"cached_tokens": math.floor(tokens_in * record.cached_share)},
        "output_tokens": tokens_out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": tokens_in + tokens_out,
    }


def _validate_create(body: dict[str, Any]) -> dict[str, Any]:
    """Check a create body the way the API does; the keyword arguments for `create_batch`."""
    for name in ("input_file_id", "endpoint", "completion_window"):
        if body.get(name) is None:
            raise SimRequestError(
                400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )
        if not isinstance(body[name], str) or not body[name]:
            raise SimRequestError(
                400, f"Invalid type for '{name}': expected a string.", param=name, code="invalid_type"
            )
    for name, allowed in (("endpoint", ENDPOINTS), ("completion_window", tuple(COMPLETION_WINDOWS))):
        if body[name] not in allowed:
            raise SimRequestError(
                400,
                f"Invalid value: '{body[name]}'. Supported values are: {', '.join(repr(a) for a in allowed)}.",
                param=name,
                code="invalid_value",
            )
    metadata = body.get("metadata")
    if metadata is not None:
        _validate_metadata(metadata)
    expiry = body.get("output_expires_after")
    if expiry is not None:
        low, high = _OUTPUT_EXPIRY_RANGE
        seconds = expiry.get("seconds") if isinstance(expiry, dict) else None
        if (
            not isinstance(expiry, dict)
            or expiry.get("anchor") != "created_at"
            or not isinstance(seconds, int)
            or not low <= seconds <= high
        ):
            raise SimRequestError(
                400,
                f"Invalid 'output_expires_after': anchor must be 'created_at' and seconds in {low}..{high}.",
                param="output_expires_after",
                code="invalid_value",
            )
    return {
        "input_file_id": body["input_file_id"],
        "endpoint": body["endpoint"],
        "completion_window": body["completion_window"],
        "metadata": metadata,
    }


def _validate_metadata(metadata: Any) -> None:
    def bad(message: str) -> SimRequestError:
        return SimRequestError(400, message, param="metadata", code="invalid_value")

    if not isinstance(metadata, dict):
        raise bad("Invalid type for 'metadata': expected an object.")
    if len(metadata) > _META_MAX_KEYS:
        raise bad(f"Invalid 'metadata': too many keys ({len(metadata)} > {_META_MAX_KEYS}).")
    for key, value in metadata.items():
        if len(key) > _META_MAX_KEY_LEN:
            raise bad(f"Invalid 'metadata': key '{key[:20]}...' is longer than {_META_MAX_KEY_LEN}.")
        if not isinstance(value, str):
            raise bad(f"Invalid type for 'metadata.{key}': expected a string.")
        if len(value) > _META_MAX_VALUE_LEN:
            raise bad(f"Invalid 'metadata.{key}': value is longer than {_META_MAX_VALUE_LEN}.")
