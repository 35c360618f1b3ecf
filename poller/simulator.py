"""A simulated OpenAI Batch API for the demo, the tests and the benchmarks.

Batch lifecycles are drawn from a seeded RNG when a batch is created and evaluated lazily against a
clock, so there are no background tasks. Faults (429, 5xx, slow, non-JSON, unknown status) are injected
on demand, programmatically or over the admin routes under ``/_sim/``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, Literal, Protocol, get_args

from aiohttp import web

FaultKind = Literal["429", "500", "503", "slow", "nonjson", "unknown_status"]
RouteKind = Literal["create", "retrieve", "list", "cancel"]
Outcome = Literal["completed", "failed", "expired"]

ROUTE_KINDS: Final[tuple[str, ...]] = get_args(RouteKind)
FAULT_KINDS: Final[tuple[str, ...]] = get_args(FaultKind)
OUTCOMES: Final[tuple[str, ...]] = get_args(Outcome)
ENDPOINTS: Final[tuple[str, ...]] = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
)
COMPLETION_WINDOWS: Final[dict[str, int]] = {"24h": 86_400}
CANCELLABLE: Final[frozenset[str]] = frozenset({"validating", "in_progress", "finalizing"})
DEFAULT_KEY: Final = "sk-sim"
_META_MAX_KEYS: Final = 16
_META_MAX_KEY_LEN: Final = 64
_META_MAX_VALUE_LEN: Final = 512
_OUTPUT_EXPIRY_RANGE: Final = (3600, 2_592_000)
_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

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


class Clock(Protocol):
    """Anything that tells the simulated time in epoch seconds."""

    def now(self) -> float: ...


class SimClock:
    """A wall clock that runs `speed` simulated seconds per real second, from `start` (default: now)."""

    def __init__(self, speed: float = 1.0, start: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self._speed = speed
        self._origin = time.time() if start is None else start
        self._mono = time.monotonic()

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        if value <= 0:
            raise ValueError("speed must be positive")
        self._origin, self._mono, self._speed = self.now(), time.monotonic(), value

    def now(self) -> float:
        return self._origin + (time.monotonic() - self._mono) * self._speed


class ManualClock:
    """A clock that moves only when told to, for tests."""

    def __init__(self, start: float | None = None) -> None:
        self._now = float(math.floor(time.time()) if start is None else start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward and return the new time."""
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError("a clock only moves forward by a finite amount")
        self._now += seconds
        return self._now


@dataclass(frozen=True)
class SimProfile:
    """How batches behave: phase durations in simulated seconds (min, max) and outcome odds."""

    validating_s: tuple[float, float] = (5.0, 120.0)
    in_progress_s: tuple[float, float] = (60.0, 3_600.0)
    finalizing_s: tuple[float, float] = (5.0, 300.0)
    cancelling_s: tuple[float, float] = (2.0, 120.0)
    p_failed: float = 0.04
    p_expired: float = 0.02
    requests: tuple[int, int] = (10, 1_000)
    request_failure_rate: tuple[float, float] = (0.0, 0.03)
    #: Share of the requests an expiring batch had finished by the deadline.
    expired_progress: tuple[float, float] = (0.2, 0.9)
    tokens_in_per_request: tuple[int, int] = (50, 1_500)
    tokens_out_per_request: tuple[int, int] = (10, 600)
    models: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "/v1/embeddings": ("text-embedding-3-small", "text-embedding-3-large"),
            "*": ("gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "gpt-4.1-mini-2025-04-14"),
        }
    )

    def __post_init__(self) -> None:
        for name in ("validating_s", "in_progress_s", "finalizing_s", "cancelling_s", "requests"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range 0 <= min <= max")
        if min(self.p_failed, self.p_expired) < 0 or self.p_failed + self.p_expired > 1:
            raise ValueError("p_failed and p_expired must be non-negative and sum to at most 1")


@dataclass
class Fault:
    """One injected misbehaviour that replaces the next `count` matching API responses."""

    kind: FaultKind
    count: int = 1
    retry_after: float | None = None
    delay: float = 1.0
    path_contains: str | None = None
    route: RouteKind | None = None
    status: str = "paused"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}")
        if self.count < 1:
            raise ValueError("count must be at least 1")
        if self.route is not None and self.route not in ROUTE_KINDS:
            raise ValueError(f"route must be one of {', '.join(ROUTE_KINDS)}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("delay and retry_after must not be negative")

    def matches(self, route: str, path: str) -> bool:
        return (self.route is None or self.route == route) and (
            self.path_contains is None or self.path_contains in path
        )


@dataclass
class SimStats:
    """Requests the API routes received, counted by route kind (faulted and refused ones included)."""

    create: int = 0
    retrieve: int = 0
    list: int = 0
    cancel: int = 0
    faulted: int = 0
    unauthorized: int = 0

    @property
    def total(self) -> int:
        return self.create + self.retrieve + self.list + self.cancel

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


class SimRequestError(Exception):
    """A request the simulated API refuses; rendered as an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class _Record:
    """One batch: what the client sent plus the lifecycle drawn at creation (simulated epoch seconds)."""

    id: str
    seq: int
    t0: float
    created_at: int
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    outcome: Outcome
    t_in_progress: float
    t_finalizing: float
    t_end: float
    total: int
    failure_rate: float
    expired_progress: float
    cancelling_s: float
    model: str
    tokens_in: int
    tokens_out: int
    cached_share: float
    output_file_id: str
    error_file_id: str
    errors: list[dict[str, Any]]
    t_cancel: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.created_at, self.seq)

    def status_at(self, now: float) -> str:
        if self.t_cancel is not None and now >= self.t_cancel:
            return "cancelled" if now >= self.t_cancel + self.cancelling_s else "cancelling"
        if now < self.t_in_progress:
            return "validating"
        if self.outcome == "failed":
            return "failed"
        if now < self.t_finalizing:
            return "in_progress"
        if self.outcome == "expired":
            return "expired"
        return "finalizing" if now < self.t_end else "completed"

    def progress_at(self, now: float) -> float:
        """Share of requests finished at `now` (before any cancel)."""
        if self.outcome == "failed" or now < self.t_in_progress:
            return 0.0
        reach = self.expired_progress if self.outcome == "expired" else 1.0
        span = self.t_finalizing - self.t_in_progress
        if span <= 0 or now >= self.t_finalizing:
            return reach
        return reach * (now - self.t_in_progress) / span

    def counts_at(self, now: float) -> dict[str, int]:
        frozen = now if self.t_cancel is None else min(now, self.t_cancel)
        if self.outcome == "failed" or frozen < self.t_in_progress:
            return {"total": 0, "completed": 0, "failed": 0}
        done = math.floor(self.total * self.progress_at(frozen))
        failed = math.floor(done * self.failure_rate)
        return {"total": self.total, "completed": done - failed, "failed": failed}

    def wire(self, now: float) -> dict[str, Any]:
        """The batch as the API sends it at `now`, with unset fields as null like the real API."""
        status = self.status_at(now)
        counts = self.counts_at(now)
        body: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": None,
            "error_file_id": None,
            "created_at": self.created_at,
            "in_progress_at": None,
            "expires_at": self.created_at + COMPLETION_WINDOWS[self.completion_window],
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": counts,
            "metadata": self.metadata,
            "model": None,
            "usage": None,
        }
        seen = min(now, self.t_cancel) if self.t_cancel is not None else now
        if self.outcome != "failed" and seen >= self.t_in_progress:
            body["in_progress_at"] = math.floor(self.t_in_progress)
        if self.outcome == "completed" and seen >= self.t_finalizing:
            body["finalizing_at"] = math.floor(self.t_finalizing)
        if self.t_cancel is not None and now >= self.t_cancel:
            body["cancelling_at"] = math.floor(self.t_cancel)
        match status:
            case "failed":
                body["failed_at"] = math.floor(self.t_in_progress)
                body["errors"] = {"object": "list", "data": self.errors}
            case "expired":
                body["expired_at"] = math.floor(self.t_finalizing)
                self._attach_files(body, counts)
            case "completed":
                body["completed_at"] = math.floor(self.t_end)
                self._attach_files(body, counts)
                body["model"] = self.model
                body["usage"] = self._usage(counts)
            case "cancelled":
                assert self.t_cancel is not None
                body["cancelled_at"] = math.floor(self.t_cancel + self.cancelling_s)
                self._attach_files(body, counts)
        return body

    def _attach_files(self, body: dict[str, Any], counts: dict[str, int]) -> None:
        if counts["completed"]:
            body["output_file_id"] = self.output_file_id
        if counts["failed"]:
            body["error_file_id"] = self.error_file_id

    def _usage(self, counts: dict[str, int]) -> dict[str, Any]:
        answered = counts["completed"]
        tokens_in = answered * self.tokens_in
        tokens_out = 0 if self.endpoint == "/v1/embeddings" else answered * self.tokens_out
        return {
            "input_tokens": tokens_in,
            "input_tokens_details": {"cached_tokens": math.floor(tokens_in * self.cached_share)},
            "output_tokens": tokens_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens_in + tokens_out,
        }


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Impl = Callable[[web.Request], Awaitable[tuple[int, dict[str, Any]]]]


class Simulator:
    """The simulated Batch API's state, its HTTP application and its programmatic controls."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        profile: SimProfile | None = None,
        seed: int = 0,
        api_keys: Iterable[str] = (DEFAULT_KEY,),
        prefixes: Sequence[str] = ("/v1",),
    ) -> None:
        self.clock: Clock = clock if clock is not None else SimClock()
        self.profile = profile if profile is not None else SimProfile()
        self.api_keys = frozenset(api_keys)
        self.prefixes = tuple("/" + p.strip("/") for p in prefixes)
        if not self.prefixes:
            raise ValueError("at least one route prefix is needed")
        self.stats = SimStats()
        self._rng = random.Random(seed)
        self._ids = random.Random(f"{seed}:ids")
        self._by_id: dict[str, _Record] = {}
        self._order: list[tuple[int, int, str]] = []  # (created_at, seq, id), oldest first
        self._seq = 0
        self._faults: list[Fault] = []

    # -- state -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._order)

    def now(self) -> float:
        return self.clock.now()

    def create_batch(
        self,
        *,
        input_file_id: str | None = None,
        endpoint: str = "/v1/chat/completions",
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        created_at: float | None = None,
        outcome: Outcome | None = None,
    ) -> dict[str, Any]:
        """Create one batch (optionally backdated or with a forced outcome) and return its wire form."""
        record = self._new_record(
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            created_at=created_at,
            outcome=outcome,
        )
        self._insert([record])
        return record.wire(self.now())

    def create_batches(
        self,
        n: int,
        *,
        endpoint: str = "/v1/chat/completions",
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        created_at: float | None = None,
        spread: float = 0.0,
        outcome: Outcome | None = None,
    ) -> list[str]:
        """Create `n` batches, created at `created_at` minus up to `spread` seconds; return their ids."""
        if n < 0 or spread < 0:
            raise ValueError("n and spread must not be negative")
        base = self.now() if created_at is None else created_at
        records = [
            self._new_record(
                input_file_id=None,
                endpoint=endpoint,
                completion_window=completion_window,
                metadata=metadata,
                created_at=base - self._rng.uniform(0.0, spread) if spread else base,
                outcome=outcome,
            )
            for _ in range(n)
        ]
        self._insert(records)
        return [r.id for r in records]

    def get(self, batch_id: str) -> dict[str, Any]:
        """The batch's wire form now; KeyError if unknown."""
        return self._by_id[batch_id].wire(self.now())

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Start cancelling a batch, as `POST /batches/{id}/cancel` does; SimRequestError if not allowed."""
        record = self._by_id.get(batch_id)
        if record is None:
            raise _not_found(batch_id)
        now = self.now()
        status = record.status_at(now)
        if status not in CANCELLABLE:
            raise SimRequestError(409, f"Cannot cancel a batch with status '{status}'.")
        record.t_cancel = now
        return record.wire(now)

    def page(self, *, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """One page of the list, newest first, as `GET /batches` answers it."""
        if after is None:
            stop = len(self._order)
        else:
            anchor = self._by_id.get(after)
            if anchor is None:
                raise SimRequestError(400, f"No batch found with id '{after}'.", param="after")
            stop = bisect.bisect_left(self._order, (*anchor.key, anchor.id))
        start = max(0, stop - limit)
        now = self.now()
        data = [self._by_id[entry[2]].wire(now) for entry in reversed(self._order[start:stop])]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": start > 0,
        }

    def _new_record(
        self,
        *,
        input_file_id: str | None,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        created_at: float | None,
        outcome: Outcome | None,
    ) -> _Record:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if completion_window not in COMPLETION_WINDOWS:
            raise ValueError(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}")
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
        rng, p = self._rng, self.profile
        t0 = self.now() if created_at is None else created_at
        window = COMPLETION_WINDOWS[completion_window]
        deadline = math.floor(t0) + window
        if outcome is None:
            roll = rng.random()
            outcome = "failed" if roll < p.p_failed else "expired" if roll < p.p_failed + p.p_expired else "completed"
        validating = min(rng.uniform(*p.validating_s), window / 4)
        in_progress = rng.uniform(*p.in_progress_s)
        finalizing = rng.uniform(*p.finalizing_s)
        budget = deadline - 1 - (t0 + validating)
        if in_progress + finalizing > budget:  # a completed batch always beats its deadline
            shrink = budget / (in_progress + finalizing)
            in_progress, finalizing = in_progress * shrink, finalizing * shrink
        t_in_progress = t0 + validating
        t_finalizing = float(deadline) if outcome == "expired" else t_in_progress + in_progress
        code, message, has_line = rng.choice(_VALIDATION_ERRORS)
        total = rng.randint(*p.requests)
        models = p.models.get(endpoint) or p.models.get("*") or ("gpt-4o-mini",)
        self._seq += 1
        return _Record(
            id=self._new_id("batch_", 32),
            seq=self._seq,
            t0=t0,
            created_at=math.floor(t0),
            endpoint=endpoint,
            input_file_id=input_file_id or self._new_id("file-", 22),
            completion_window=completion_window,
            metadata=dict(metadata) if metadata is not None else None,
            outcome=outcome,
            t_in_progress=t_in_progress,
            t_finalizing=t_finalizing,
            t_end=t_finalizing + finalizing,
            total=total,
            failure_rate=rng.uniform(*p.request_failure_rate),
            expired_progress=rng.uniform(*p.expired_progress),
            cancelling_s=rng.uniform(*p.cancelling_s),
            model=rng.choice(models),
            tokens_in=rng.randint(*p.tokens_in_per_request),
            tokens_out=rng.randint(*p.tokens_out_per_request),
            cached_share=rng.uniform(0.0, 0.5),
            output_file_id=self._new_id("file-", 22),
            error_file_id=self._new_id("file-", 22),
            errors=[
                {
                    "code": code,
                    "line": rng.randint(1, total) if has_line else None,
                    "message": message,
                    "param": None,
                }
            ],
        )

    def _new_id(self, prefix: str, length: int) -> str:
        while True:
            candidate = prefix + "".join(self._ids.choices(_ID_ALPHABET, k=length))
            if candidate not in self._by_id:
                return candidate

    def _insert(self, records: list[_Record]) -> None:
        """Add records keeping `_order` sorted; appends in order are O(1), a backdated bulk sorts once."""
        for r in records:
            self._by_id[r.id] = r
        entries = [(*r.key, r.id) for r in records]
        if len(entries) == 1:
            bisect.insort(self._order, entries[0])
            return
        order, first = self._order, max(len(self._order) - 1, 0)
        order.extend(entries)
        if any(order[i] > order[i + 1] for i in range(first, len(order) - 1)):
            order.sort()

    # -- faults ------------------------------------------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        """Queue a fault; it replaces the next `fault.count` matching API responses."""
        self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        """Faults still pending, oldest first."""
        return list(self._faults)

    def _take_fault(self, route: str, path: str) -> Fault | None:
        for fault in self._faults:
            if fault.matches(route, path):
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    # -- HTTP --------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """An aiohttp application serving the API under every prefix, plus `/_sim/` admin routes."""
        app = web.Application(middlewares=[_errors_middleware])
        app.on_response_prepare.append(_stamp_request_id)
        for prefix in self.prefixes:
            app.router.add_post(f"{prefix}/batches", self._endpoint("create", self._http_create))
            app.router.add_get(f"{prefix}/batches", self._endpoint("list", self._http_list))
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", self._endpoint("retrieve", self._http_get))
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", self._endpoint("cancel", self._http_cancel))
        app.router.add_get("/_sim/faults", self._admin_faults)
        app.router.add_post("/_sim/faults", self._admin_inject)
        app.router.add_delete("/_sim/faults", self._admin_clear_faults)
        app.router.add_post("/_sim/batches", self._admin_create)
        app.router.add_post("/_sim/advance", self._admin_advance)
        app.router.add_get("/_sim/clock", self._admin_clock)
        app.router.add_get("/_sim/stats", self._admin_stats)
        app.router.add_delete("/_sim/stats", self._admin_reset_stats)
        return app

    def _authorized(self, request: web.Request) -> SimRequestError | None:
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("api-key")
        if not key:
            return SimRequestError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if key not in self.api_keys:
            shown = f"{key[:3]}{'*' * max(0, len(key) - 7)}{key[-4:]}" if len(key) > 7 else "*" * len(key)
            return SimRequestError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        return None

    def _endpoint(self, route: RouteKind, impl: _Impl) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            setattr(self.stats, route, getattr(self.stats, route) + 1)
            refused = self._authorized(request)
            if refused is not None:
                self.stats.unauthorized += 1
                return _error_response(refused)
            fault = self._take_fault(route, request.path_qs)
            if fault is not None:
                self.stats.faulted += 1
                replaced = _fault_response(fault)
                if replaced is not None:
                    return replaced
                if fault.kind == "slow":
                    await asyncio.sleep(fault.delay)
            try:
                status, body = await impl(request)
            except SimRequestError as exc:
                return _error_response(exc)
            if fault is not None and fault.kind == "unknown_status" and status == 200:
                for batch in body.get("data", [body]):
                    batch["status"] = fault.status
            return web.json_response(body, status=status)

        return handle

    async def _http_create(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        body = await _json_object(request)
        params = _validate_create(body)
        return 200, self.create_batch(**params)

    async def _http_get(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self._by_id:
            raise _not_found(batch_id)
        return 200, self.get(batch_id)

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

    async def _admin_faults(self, _: web.Request) -> web.Response:
        return web.json_response({"faults": [asdict(f) for f in self._faults]})

    async def _admin_inject(self, request: web.Request) -> web.Response:
        body = await _admin_json(request)
        allowed = {f.name for f in fields(Fault)}
        unknown = sorted(set(body) - allowed)
        if unknown:
            return _admin_error(f"unknown fault field(s): {', '.join(unknown)}")
        try:
            fault = self.inject(Fault(**body))
        except (TypeError, ValueError) as exc:
            return _admin_error(str(exc))
        return web.json_response({"fault": asdict(fault), "pending": len(self._faults)})

    async def _admin_clear_faults(self, _: web.Request) -> web.Response:
        self.clear_faults()
        return web.json_response({"pending": 0})

    async def _admin_create(self, request: web.Request) -> web.Response:
        body = await _admin_json(request)
        allowed = {"count", "endpoint", "completion_window", "metadata", "created_at", "spread", "outcome"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            return _admin_error(f"unknown field(s): {', '.join(unknown)}")
        count = body.pop("count", 1)
        if not isinstance(count, int) or count < 0:
            return _admin_error("count must be a non-negative integer")
        try:
            ids = self.create_batches(count, **body)
        except (TypeError, ValueError) as exc:
            return _admin_error(str(exc))
        return web.json_response({"ids": ids, "count": len(ids), "total": len(self)})

    async def _admin_advance(self, request: web.Request) -> web.Response:
        body = await _admin_json(request)
        seconds = body.get("seconds")
        if not isinstance(self.clock, ManualClock):
            return _admin_error("the simulator's clock is not a ManualClock", status=409)
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            return _admin_error("seconds must be a number")
        try:
            now = self.clock.advance(seconds)
        except ValueError as exc:
            return _admin_error(str(exc))
        return web.json_response({"now": now})

    async def _admin_clock(self, _: web.Request) -> web.Response:
        speed = self.clock.speed if isinstance(self.clock, SimClock) else None
        return web.json_response({"now": self.now(), "kind": type(self.clock).__name__, "speed": speed})

    async def _admin_stats(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": {route: getattr(self.stats, route) for route in ROUTE_KINDS},
                **{k: v for k, v in self.stats.as_dict().items() if k not in ROUTE_KINDS},
                "batches": len(self),
                "faults_pending": len(self._faults),
            }
        )

    async def _admin_reset_stats(self, _: web.Request) -> web.Response:
        self.stats.reset()
        return web.json_response(self.stats.as_dict())


def _not_found(batch_id: str) -> SimRequestError:
    return SimRequestError(404, f"No batch found with id '{batch_id}'.", code="not_found")


def _error_response(exc: SimRequestError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


def _admin_error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise SimRequestError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        )
    return body


async def _admin_json(request: web.Request) -> dict[str, Any]:
    return await _json_object(request) if request.can_read_body else {}


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


def _fault_response(fault: Fault) -> web.Response | None:
    """The response that replaces the real one, or None when the fault alters the real one."""
    match fault.kind:
        case "429":
            wait = 1.0 if fault.retry_after is None else fault.retry_after
            exc = SimRequestError(
                429,
                "Rate limit reached for requests in organization org-sim on batch requests per min (RPM): "
                f"Limit 500, Used 500, Requested 1. Please try again in {wait:g}s.",
                code="rate_limit_exceeded",
                type_="requests",
            )
            response = _error_response(exc)
            response.headers["Retry-After"] = str(math.ceil(wait))
            response.headers["retry-after-ms"] = str(round(wait * 1000))
            response.headers["x-ratelimit-remaining-requests"] = "0"
            return response
        case "500":
            return _error_response(
                SimRequestError(
                    500,
                    "The server had an error while processing your request. Sorry about that!",
                    type_="server_error",
                )
            )
        case "503":
            response = _error_response(
                SimRequestError(
                    503, "The server is overloaded or not ready yet.", type_="server_error", code="overloaded"
                )
            )
            if fault.retry_after is not None:
                response.headers["Retry-After"] = str(math.ceil(fault.retry_after))
            return response
        case "nonjson":
            return web.Response(
                text="<html><head><title>502 Bad Gateway</title></head>"
                "<body><center><h1>502 Bad Gateway</h1></center></body></html>",
                content_type="text/html",
            )
        case _:
            return None


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns refusals and aiohttp's routing errors into OpenAI-shaped error bodies."""
    try:
        return await handler(request)
    except SimRequestError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        message = f"Invalid URL ({request.method} {request.path})" if exc.status in (404, 405) else exc.reason
        return web.json_response(
            SimRequestError(exc.status, message).body(), status=exc.status, headers=_allow_header(exc)
        )


def _allow_header(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


async def _stamp_request_id(_: web.Request, response: web.StreamResponse) -> None:
    """Gives every response, errors included, an `x-request-id` as the real API does."""
    response.headers.setdefault("x-request-id", f"req_{uuid.uuid4().hex}")


@asynccontextmanager
async def serve(sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `sim` on a (free, by default) port and yield its API base URL, e.g. http://127.0.0.1:PORT/v1."""
    runner = web.AppRunner(sim.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield f"http://{host}:{bound}{sim.prefixes[0]}"
    finally:
        await runner.cleanup()


async def _run_forever(sim: Simulator, host: str, port: int) -> None:
    async with serve(sim, host, port) as url:
        print(f"batch API simulator at {url} (admin under /_sim/), key {DEFAULT_KEY}")
        with suppress(asyncio.CancelledError):
            await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the simulator standalone: `python -m poller.simulator --speed 1440`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=0, help="batches to create at start")
    parser.add_argument("--prefix", action="append", help="API route prefix (repeatable; default /v1)")
    args = parser.parse_args(argv)
    sim = Simulator(clock=SimClock(speed=args.speed), seed=args.seed, prefixes=args.prefix or ("/v1",))
    sim.create_batches(args.batches)
    with suppress(KeyboardInterrupt):
        asyncio.run(_run_forever(sim, args.host, args.port))


if __name__ == "__main__":
    main()
