"""A simulated OpenRouter batch API, wire-compatible with the official `openrouter` SDK (`client.batch`):
create (202), get (results inline once final), list (newest first, `after` cursor, `limit` 1-100, results
always null) and delete (a finished batch only), under `/api/v1/batches`.

OpenRouter has no cancel route; `cancel()` here stands for a cancel from elsewhere (the dashboard, the
upstream provider). List items collapse finalizing and cancelling into in_progress, as the API's list
does. Stamps are `created_at` and `finalized_at` only. Errors are `{"error": {"code", "message"}}`. A 429
fault sends `X-RateLimit-Remaining: 0` and `X-RateLimit-Reset` (epoch milliseconds, wall clock), and a
Retry-After only when the fault sets `retry_after`. DELETE is counted under the `cancel` route kind.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from poller.sim._draw import draw_lifecycle
from poller.sim.base import DEFAULT_KEY, SimApi, SimRequestError, json_object
from poller.sim.clock import Clock
from poller.sim.faults import Fault
from poller.sim.lifecycle import Outcome, SimBatch, SimProfile, new_id

ENDPOINTS: Final[tuple[str, ...]] = ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/embeddings")
LIST_STATUSES: Final = frozenset({"validating", "in_progress", "completed", "failed", "expired", "cancelled"})
UPSTREAMS: Final[tuple[tuple[str, str], ...]] = (
    ("openai/gpt-4o-mini", "OpenAI"),
    ("anthropic/claude-haiku-4.5", "Anthropic"),
)
WINDOW: Final = 86_400
_FINISHED: Final = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(kw_only=True)
class OpenRouterBatch(SimBatch):
    endpoint: str
    model: str
    upstream: str
    expires_after: int | None
    custom_ids: list[str] | None
    tokens_in: int
    tokens_out: int


class OpenRouterSim(SimApi):
    """The simulated OpenRouter batch API; `results=False` leaves `results` null on every answer."""

    provider = "openrouter"
    base_path = "/api/v1"

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        profile: SimProfile | None = None,
        seed: int = 0,
        api_keys: Sequence[str] = (DEFAULT_KEY,),
        results: bool = True,
    ) -> None:
        super().__init__(clock=clock, profile=profile, seed=seed, api_keys=tuple(api_keys))
        self.results = results

    # -- state -------------------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancel a batch from outside the API (OpenRouter's API has no cancel); SimRequestError if not allowed."""
        record = self.start_cancel(batch_id)
        assert isinstance(record, OpenRouterBatch)
        return self.wire(record)

    def delete(self, batch_id: str) -> dict[str, Any]:
        """Delete a finished batch, as `DELETE /batches/{id}` does; SimRequestError (409) while it runs."""
        record = self.book.get(batch_id)
        if record is None:
            raise self.not_found(batch_id)
        if record.status_at(self.now()) not in _FINISHED:
            raise SimRequestError(409, "Only batches in a terminal status can be deleted.")
        del self.book.by_id[batch_id]
        self.book._order = [e for e in self.book._order if e[2] != batch_id]  # noqa: SLF001 - the book has no removal
        target: dict[str, Any] = {"openrouter": "deleted"}
        if record.status_at(self.now()) != "failed":  # a failed batch never reached a provider
            target["upstream"] = {"provider": record.upstream, "status": "unsupported"}
        return {"id": batch_id, "object": "batch", "deletion": target}

    def page(
        self,
        *,
        limit: int = 20,
        after: str | None = None,
        statuses: Sequence[str] = (),
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> dict[str, Any]:
        """One page of `GET /batches`, newest first, as list items (results null, phases collapsed)."""
        now = self.now()
        records = self.book.newest_first()
        if after is not None:
            index = next((i for i, r in enumerate(records) if r.id == after), None)
            if index is None:
                raise SimRequestError(400, f"No batch found with id '{after}'.")
            records = records[index + 1 :]
        matching = [
            r
            for r in records
            if (not statuses or _listed(r.status_at(now)) in statuses)
            and (created_after is None or r.created_at > created_after)
            and (created_before is None or r.created_at < created_before)
        ]
        data = [self.wire(r, listed=True) for r in matching[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(matching) > limit,
        }

    def _new_record(
        self,
        *,
        endpoint: str = "/v1/chat/completions",
        model: str | None = None,
        custom_ids: list[str] | None = None,
        expires_after: int | None = WINDOW,
        created_at: float | None = None,
        outcome: Outcome | None = None,
    ) -> OpenRouterBatch:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        rng = self._rng
        t0 = self.now() if created_at is None else created_at
        drawn = draw_lifecycle(rng, self.profile, t0, expires_after or WINDOW, outcome)
        if custom_ids is not None:
            drawn["total"] = len(custom_ids)
        chosen, upstream = rng.choice(UPSTREAMS)
        return OpenRouterBatch(
            id=new_id(self._ids, "batch_", 26, self.book.by_id),
            seq=self._next_seq(),
            metadata=None,
            endpoint=endpoint,
            model=model or chosen,
            upstream=upstream,
            expires_after=expires_after,
            custom_ids=custom_ids,
            tokens_in=rng.randint(*self.profile.tokens_in_per_request),
            tokens_out=rng.randint(*self.profile.tokens_out_per_request),
            **drawn,
        )

    # -- the wire form -----------------------------------------------------------------------------

    def wire(self, record: OpenRouterBatch, *, listed: bool = False) -> dict[str, Any]:
        """The batch as a retrieve answers it now, or as a list item (`listed`)."""
        now = self.now()
        status = record.status_at(now)
        counts = record.counts_at(now)
        ended = record.entered_at(status, now) if status in _FINISHED else None
        done = counts["completed"]
        usage: dict[str, Any] | None = None
        if status in _FINISHED and done:
            prompt, completion = done * record.tokens_in, done * record.tokens_out
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            usage["cost"] = round((prompt * 0.075 + completion * 0.3) / 1e6, 6)
        return {
            "id": record.id,
            "object": "batch",
            "endpoint": record.endpoint,
            "model": record.model,
            "provider": None if status == "validating" else record.upstream,
            "completion_window": "24h",
            "status": _listed(status) if listed else status,
            "created_at": record.created_at,
            "expires_at": None if record.expires_after is None else record.created_at + record.expires_after,
            "finalized_at": None if ended is None else math.floor(ended),
            "request_counts": counts,
            "error": {"message": "The input failed validation: no request has a valid body."}
            if status == "failed"
            else None,
            "usage": usage,
            "results": None if listed or not self.results else _results(record, status, counts),
        }

    # -- HTTP --------------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        prefix = self.base_path
        app.router.add_post(f"{prefix}/batches", self.endpoint("create", self._http_create))
        app.router.add_get(f"{prefix}/batches", self.endpoint("list", self._http_list))
        app.router.add_get(f"{prefix}/batches/{{batch_id}}", self.endpoint("retrieve", self._http_get))
        app.router.add_delete(f"{prefix}/batches/{{batch_id}}", self.endpoint("cancel", self._http_delete))

    def authorize(self, request: web.Request) -> SimRequestError | None:
        header = request.headers.get("Authorization", "")
        return self._check_key(header[7:].strip() if header[:7].lower() == "bearer " else None)

    def error_body(self, exc: SimRequestError) -> Any:
        return {"error": {"code": exc.status, "message": exc.message}}

    def not_found(self, batch_id: str) -> SimRequestError:
        return SimRequestError(404, f"Batch {batch_id} not found")

    def _fault_response(self, fault: Fault) -> web.Response | None:
        if fault.kind != "429":
            return super()._fault_response(fault)
        wait = 1.0 if fault.retry_after is None else fault.retry_after
        reset_ms = math.ceil((time.time() + wait) * 1000)  # rate limits run on the wall clock
        headers = {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset_ms)}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(fault.retry_after))
        return self.error_response(SimRequestError(429, "Rate limit exceeded: too many requests"), headers)

    async def _http_create(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        body = await json_object(request)
        if body.get("endpoint") not in ENDPOINTS:
            raise SimRequestError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise SimRequestError(400, "model is required")
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            raise SimRequestError(400, "requests must be a non-empty list")
        ids = [r.get("custom_id") if isinstance(r, dict) else None for r in requests]
        if not all(isinstance(i, str) and i for i in ids) or len(set(ids)) != len(ids):
            raise SimRequestError(400, "every request needs a unique custom_id")
        if body.get("completion_window", "24h") != "24h":
            raise SimRequestError(400, "completion_window must be '24h'")
        return 202, self.create_batch(endpoint=body["endpoint"], model=body["model"], custom_ids=ids)

    async def _http_list(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        query = request.query
        raw = query.get("limit", "20")
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise SimRequestError(400, f"limit must be an integer from 1 through 100, got '{raw}'")
        statuses = query.getall("status", [])
        if any(s not in LIST_STATUSES for s in statuses):
            raise SimRequestError(400, f"status must be one of {', '.join(sorted(LIST_STATUSES))}")
        return 200, self.page(
            limit=limit,
            after=query.get("after") or None,
            statuses=statuses,
            created_after=_timestamp(query.get("created_after")),
            created_before=_timestamp(query.get("created_before")),
        )

    async def _http_delete(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        return 200, self.delete(request.match_info["batch_id"])


def _listed(status: str) -> str:
    """The status as the list shows it: stored jobs collapse finalizing and cancelling into in_progress."""
    return "in_progress" if status in {"finalizing", "cancelling"} else status


def _timestamp(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise SimRequestError(400, f"'{raw}' is not a timestamp") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _results(record: OpenRouterBatch, status: str, counts: dict[str, int]) -> list[dict[str, Any]] | None:
    """One result per finished request, once the batch is final (a failed batch ran none)."""
    if status not in _FINISHED or status == "failed":
        return None
    custom = record.custom_ids or [f"request-{i}" for i in range(record.total)]
    out: list[dict[str, Any]] = []
    for i, custom_id in enumerate(custom[: counts["completed"] + counts["failed"]]):
        rid = f"{record.id}-{i}"
        if i < counts["failed"]:
            error = {"message": "Upstream provider error", "param": None, "type": "server_error"}
            out.append({"id": rid, "custom_id": custom_id, "error": error, "response": None})
            continue
        message = {"role": "assistant", "content": "OK", "refusal": None}
        choice = {
            "index": 0,
            "finish_reason": "stop",
            "native_finish_reason": "stop",
            "logprobs": None,
            "message": message,
        }
        completion = {
            "id": f"gen-{rid}",
            "object": "chat.completion",
            "created": record.created_at,
            "model": record.model,
            "choices": [choice],
        }
        response = {"status_code": 200, "request_id": f"req-{rid}", "body": completion}
        out.append({"id": rid, "custom_id": custom_id, "error": None, "response": response})
    return out
