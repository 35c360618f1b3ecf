"""What every provider's simulator shares: the clock, seeded randomness, faults, request counters, the
admin routes under ``/_sim/`` and serving on a loopback port.

A provider's simulator subclasses `SimApi`: it adds its API routes in `routes`, checks credentials its
provider's way in `authorize`, renders errors in its provider's shape in `error_body`, and sets an
unknown status in `set_status` (for the `unknown_status` fault).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, fields
from typing import Any, ClassVar

from aiohttp import web

from poller.sim.clock import Clock, ManualClock, SimClock
from poller.sim.faults import ROUTE_KINDS, Fault, FaultQueue, RouteKind, SimStats
from poller.sim.lifecycle import BatchBook, SimBatch, SimProfile

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Impl = Callable[[web.Request], Awaitable[tuple[int, Any]]]

DEFAULT_KEY = "sk-sim"
#: Deeper than CPython's default recursion limit, so a naive recursive parser fails on it.
_DEEP_JSON = ("[" * 5000 + "]" * 5000).encode()
_HTML_404 = (
    b"<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1></center>"
    b"<hr><center>nginx</center></body></html>"
)
_HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"
)


class SimRequestError(Exception):
    """A request the simulated API refuses; rendered in the provider's error shape by `SimApi.error_body`."""

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
        """The OpenAI error shape (the default `SimApi.error_body`)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SimApi:
    """One simulated provider API: state, faults and counters, and its aiohttp application."""

    #: The provider name, as `[[sources]] provider` spells it.
    provider: ClassVar[str] = "?"

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        profile: SimProfile | None = None,
        seed: int = 0,
        api_keys: tuple[str, ...] | frozenset[str] = (DEFAULT_KEY,),
    ) -> None:
        self.clock: Clock = clock if clock is not None else SimClock()
        self.profile = profile if profile is not None else SimProfile()
        self.api_keys = frozenset(api_keys)
        self.stats = SimStats()
        self._rng = random.Random(seed)
        self._ids = random.Random(f"{seed}:ids")
        self._seq = 0
        self._faults = FaultQueue()
        self.book: BatchBook[Any] = BatchBook()

    def __len__(self) -> int:
        return len(self.book)

    def now(self) -> float:
        return self.clock.now()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def record(self, batch_id: str) -> SimBatch:
        """The lifecycle record of a batch; KeyError if unknown."""
        record = self.book.by_id[batch_id]
        assert isinstance(record, SimBatch)
        return record

    #: A new batch record (not yet in the book) with the provider's defaults overridden by keyword fields.
    _new_record: Callable[..., SimBatch]

    def create_batch(self, **fields: Any) -> dict[str, Any]:
        """Create one batch (fields as `_new_record` takes them) and return its wire form."""
        record = self._new_record(**fields)
        self.book.add([record])
        return self.wire(record)

    def create_batches(
        self, n: int, *, spread: float = 0.0, created_at: float | None = None, **fields: Any
    ) -> list[str]:
        """Create `n` batches, created at `created_at` (default now) minus up to `spread` seconds; their ids."""
        if n < 0 or spread < 0:
            raise ValueError("n and spread must not be negative")
        base = self.now() if created_at is None else created_at
        records = [
            self._new_record(created_at=base - self._rng.uniform(0.0, spread) if spread else base, **fields)
            for _ in range(n)
        ]
        self.book.add(records)
        return [r.id for r in records]

    def new_batches(self, n: int, fields: dict[str, Any]) -> list[str]:
        """Create `n` batches with the provider's defaults overridden by `fields`; returns their ids.

        Raises TypeError or ValueError for fields the provider does not know or values it refuses.
        """
        return self.create_batches(n, **fields)

    async def _http_get(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        """`GET` of one batch by the `batch_id` in the route."""
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.book:
            raise self.not_found(batch_id)
        return 200, self.get(batch_id)

    def wire(self, record: Any) -> dict[str, Any]:
        """A batch as the provider's API sends it now."""
        raise NotImplementedError

    def get(self, batch_id: str) -> dict[str, Any]:
        """The batch's wire form now; KeyError if unknown."""
        return self.wire(self.book.by_id[batch_id])

    def common_status(self, batch_id: str) -> str:
        """The batch's status on the common lifecycle now (for tests that span providers)."""
        return self.record(batch_id).status_at(self.now())

    def start_cancel(self, batch_id: str) -> SimBatch:
        """Begin cancelling, as the provider's cancel route does; SimRequestError when not allowed."""
        record = self.book.get(batch_id)
        if not isinstance(record, SimBatch):
            raise self.not_found(batch_id)
        now = self.now()
        status = record.status_at(now)
        if status not in {"validating", "in_progress", "finalizing"}:
            raise SimRequestError(409, f"Cannot cancel a batch with status '{status}'.")
        record.t_cancel = now
        return record

    # -- faults ------------------------------------------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        """Queue a fault; it replaces the next `fault.count` matching API responses."""
        return self._faults.add(fault)

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        """Faults still pending, oldest first."""
        return self._faults.pending()

    # -- what each provider overrides --------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def authorize(self, request: web.Request) -> SimRequestError | None:
        """None when the request carries a known key (Bearer, or Azure's `api-key`)."""
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("api-key")
        return self._check_key(key)

    def _check_key(self, key: str | None) -> SimRequestError | None:
        if not key:
            return SimRequestError(401, "No API key provided.", type_="authentication_error")
        if key not in self.api_keys:
            shown = f"{key[:3]}{'*' * max(0, len(key) - 7)}{key[-4:]}" if len(key) > 7 else "*" * len(key)
            return SimRequestError(
                401, f"Incorrect API key provided: {shown}.", code="invalid_api_key", type_="authentication_error"
            )
        return None

    def error_body(self, exc: SimRequestError) -> Any:
        return exc.body()

    def set_status(self, body: Any, status: str) -> None:
        """Overwrite the status of every batch in a 200 answer (the `unknown_status` fault)."""
        for batch in body.get("data", [body]) if isinstance(body, dict) else body:
            batch["status"] = status

    def set_created(self, body: Any, value: int) -> None:
        """Overwrite the creation time of every batch in a 200 answer (the `huge_int` fault)."""
        for batch in body.get("data", [body]) if isinstance(body, dict) else body:
            batch["created_at"] = value

    def not_found(self, batch_id: str) -> SimRequestError:
        return SimRequestError(404, f"No batch found with id '{batch_id}'.", code="not_found")

    # -- HTTP --------------------------------------------------------------------------------------

    def error_response(self, exc: SimRequestError, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(self.error_body(exc), status=exc.status, headers=headers)

    def app(self) -> web.Application:
        """An aiohttp application serving the provider's API plus the `/_sim/` admin routes."""
        app = web.Application(middlewares=[self._errors_middleware])
        app.on_response_prepare.append(_stamp_request_id)
        self.routes(app)
        app.router.add_get("/_sim/faults", self._admin_faults)
        app.router.add_post("/_sim/faults", self._admin_inject)
        app.router.add_delete("/_sim/faults", self._admin_clear_faults)
        app.router.add_post("/_sim/batches", self._admin_create)
        app.router.add_post("/_sim/advance", self._admin_advance)
        app.router.add_get("/_sim/clock", self._admin_clock)
        app.router.add_get("/_sim/stats", self._admin_stats)
        app.router.add_delete("/_sim/stats", self._admin_reset_stats)
        return app

    def endpoint(self, route: RouteKind, impl: Impl) -> Handler:
        """Wrap a route's implementation with counting, auth and fault injection."""

        async def handle(request: web.Request) -> web.StreamResponse:
            self.stats.count(route)
            refused = self.authorize(request)
            if refused is not None:
                self.stats.unauthorized += 1
                return self.error_response(refused)
            fault = self._faults.take(route, request.path_qs)
            if fault is not None:
                self.stats.faulted += 1
                replaced = self._fault_response(fault)
                if replaced is not None:
                    return replaced
                if fault.kind == "slow":
                    await asyncio.sleep(fault.delay)
            try:
                status, body = await impl(request)
            except SimRequestError as exc:
                return self.error_response(exc)
            if fault is not None and status == 200:
                if fault.kind == "unknown_status":
                    self.set_status(body, fault.status)
                elif fault.kind == "huge_int":
                    self.set_created(body, 2**70)
            return web.json_response(body, status=status)

        return handle

    def _fault_response(self, fault: Fault) -> web.Response | None:  # noqa: PLR0911 - one answer per fault kind
        """The response that replaces the real one, or None when the fault alters the real one."""
        match fault.kind:
            case "429":
                wait = 1.0 if fault.retry_after is None else fault.retry_after
                exc = SimRequestError(
                    429,
                    f"Rate limit reached for requests. Please try again in {wait:g}s.",
                    code="rate_limit_exceeded",
                    type_="rate_limit_error",
                )
                headers = {
                    "Retry-After": str(math.ceil(wait)),
                    "retry-after-ms": str(round(wait * 1000)),
                    "x-ratelimit-remaining-requests": "0",
                }
                return self.error_response(exc, headers)
            case "500":
                return self.error_response(
                    SimRequestError(500, "The server had an error while processing your request.", type_="server_error")
                )
            case "503":
                headers = {} if fault.retry_after is None else {"Retry-After": str(math.ceil(fault.retry_after))}
                exc = SimRequestError(503, "The server is overloaded.", type_="server_error", code="overloaded")
                return self.error_response(exc, headers)
            case "nonjson":
                return web.Response(body=_HTML_502, content_type="text/html")
            case "html404":
                return web.Response(status=404, body=_HTML_404, content_type="text/html")
            case "deep_json":
                return web.Response(body=_DEEP_JSON, content_type="application/json")
            case _:
                return None

    @web.middleware
    async def _errors_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Turns refusals and aiohttp's routing errors into the provider's error bodies."""
        try:
            return await handler(request)
        except SimRequestError as exc:
            return self.error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400 or exc.content_type == "application/json":
                raise
            message = f"Invalid URL ({request.method} {request.path})" if exc.status in (404, 405) else exc.reason
            allow = exc.headers.get("Allow")
            return self.error_response(SimRequestError(exc.status, message), {"Allow": allow} if allow else None)

    # -- admin routes ------------------------------------------------------------------------------

    async def _admin_faults(self, _: web.Request) -> web.Response:
        return web.json_response({"faults": [asdict(f) for f in self.faults]})

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
        count = body.pop("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return _admin_error("count must be a non-negative integer")
        try:
            ids = self.new_batches(count, body)
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


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; SimRequestError when it is not one."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise SimRequestError(400, "We could not parse the JSON body of your request.")
    return body


async def _admin_json(request: web.Request) -> dict[str, Any]:
    return await json_object(request) if request.can_read_body else {}


def _admin_error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def _stamp_request_id(_: web.Request, response: web.StreamResponse) -> None:
    """Gives every response, errors included, an `x-request-id` as the real APIs do."""
    response.headers.setdefault("x-request-id", f"req_{uuid.uuid4().hex}")


@asynccontextmanager
async def serve(sim: SimApi, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `sim` on a (free, by default) port and yield its API base URL (`sim.base_path` appended)."""
    runner = web.AppRunner(sim.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield f"http://{host}:{bound}{getattr(sim, 'base_path', '')}"
    finally:
        await runner.cleanup()


async def serve_forever(sim: SimApi, host: str, port: int, ready: Callable[[str], None]) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(sim, host, port) as url:
        ready(url)
        with suppress(asyncio.CancelledError):
            await stop.wait()
