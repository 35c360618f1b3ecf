"""The HTTP service: health probes, Prometheus metrics and the control API, on `[service] listen`.

`/healthz`, `/readyz` and `/metrics` are always open (probes and Prometheus carry no credentials);
every `/v1/*` route requires `Authorization: Bearer <token>` when `service.token_env`/`token_file` is set.
The service reads the daemon only through `ServiceBackend`, so this module never imports the daemon.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from poller.config import ServiceConfig, read_secret
from poller.errors import ConfigError
from poller.metrics import Metrics
from poller.records import TrackedBatch
from poller.store import Store

log = structlog.get_logger("poller.service")

#: What POST accepts as a batch id (matched whole: `$` alone would let a trailing newline through).
BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Most ids one POST may track; a bigger list is refused with 400 rather than held on the event loop.
MAX_IDS = 1000
#: Requests are short, so a stopping service waits only this long for the ones in flight.
SHUTDOWN_GRACE = 2.0
#: The control API's paths; everything under it needs the token when one is configured.
CONTROL_PREFIX = "/v1/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BatchStore(Protocol):
    """What the service uses of the daemon's state store: point reads on the loop, and the file for bulk reads."""

    @property
    def path(self) -> Path: ...

    def batch(self, source: str, batch_id: str) -> TrackedBatch | None: ...


class ServiceBackend(Protocol):
    """Everything the service uses of the daemon; `poller.daemon.Daemon` satisfies it.

    All of it is called on the event loop, except `batch_view`, which must stay a pure function of its
    argument: listings build their views in a worker thread.
    """

    @property
    def source(self) -> str: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def store(self) -> BatchStore: ...

    def liveness(self) -> tuple[bool, dict[str, object]]: ...

    def readiness(self) -> tuple[bool, dict[str, object]]: ...

    def status_line(self) -> str: ...

    def tracked_counts(self) -> dict[str, int]: ...

    def track(self, ids: list[str], origin: str) -> list[str]: ...

    def untrack(self, ids: list[str]) -> list[str]: ...

    def batch_view(self, batch: TrackedBatch) -> dict[str, object]: ...

    def sink_views(self) -> dict[str, dict[str, object]]: ...


class BadRequestError(Exception):
    """A control API request body that cannot be used; the message is returned to the client."""


class Service:
    """Serves the endpoints while entered; `__aexit__` stops accepting and closes every connection.

    Construction reads the bearer token (raising `ConfigError` if it is configured but missing), so a
    bad secret fails before anything binds. Binding failures also raise `ConfigError` naming `service.listen`.
    """

    def __init__(self, daemon: ServiceBackend, config: ServiceConfig, *, environ: dict[str, str] | None = None) -> None:
        self._daemon = daemon
        self._config = config
        self._token: bytes | None = None
        if config.token_env is not None or config.token_file is not None:
            self._token = read_secret("service.token", config.token_env, config.token_file, environ).encode()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when `listen` asked for port 0)."""
        if self._port is None:
            raise RuntimeError("the service is not running")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the service, e.g. http://127.0.0.1:9464 (no trailing slash)."""
        host = self._config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._config.host, self._config.port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                "service.listen",
                f"cannot listen on {self._config.listen}: {exc.strerror or exc}",
                "choose a free port and an address of this host, or set service.enabled = false",
                self._config.listen,
            ) from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("service listening", url=self.url, control_api_auth=self._token is not None)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- the application ---------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        router = app.router
        router.add_get("/healthz", self._healthz)
        router.add_get("/readyz", self._readyz)
        router.add_get("/metrics", self._metrics)
        router.add_get("/v1/status", self._status)
        router.add_get("/v1/batches", self._list)
        router.add_post("/v1/batches", self._track)
        router.add_get("/v1/batches/{batch_id}", self._retrieve)
        router.add_delete("/v1/batches/{batch_id}", self._untrack)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Bearer auth on the control API, and JSON error bodies for every refusal and crash."""
        control = request.path.startswith(CONTROL_PREFIX) or request.path == CONTROL_PREFIX.rstrip("/")
        if control and not self._authorized(request):
            return _error(
                401,
                "missing or wrong bearer token: send Authorization: Bearer <service token>",
                "authentication_error",
                {"WWW-Authenticate": 'Bearer realm="batch-poller"'},
            )
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "not_found" if exc.status == 404 else "invalid_request_error"
            allow = exc.headers.get("Allow")
            message = f"{exc.reason}: {request.method} {request.path}"
            return _error(exc.status, message, kind, {"Allow": allow} if allow else None)
        except BadRequestError as exc:
            return _error(400, str(exc), "invalid_request_error")
        except Exception:
            log.exception("service request failed", method=request.method, path=request.path)
            return _error(500, "internal error; see the batch-poller log", "server_error")

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest runs in time independent of where the bytes differ.
        match = hmac.compare_digest(given.strip().encode("utf-8", "backslashreplace"), self._token)
        return match and scheme.lower() == "bearer"

    # -- probes and metrics ------------------------------------------------------------------------

    async def _healthz(self, _: web.Request) -> web.Response:
        ok, detail = self._daemon.liveness()
        return web.json_response(_with_status(ok, detail), status=200 if ok else 503)

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, detail = self._daemon.readiness()
        body = _with_status(ok, detail)
        body.setdefault("reasons", [])
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        self._refresh_gauges()
        # The registry is thread-safe; rendering a large one should not stall the poll loop.
        body = await asyncio.to_thread(generate_latest, self._daemon.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _refresh_gauges(self) -> None:
        """Set the gauges that are computed on demand (outbox depth and age, sink health) from the store."""
        metrics = self._daemon.metrics
        for name, view in self._daemon.sink_views().items():
            metrics.outbox_pending.labels(name).set(_number(view.get("pending")))
            metrics.outbox_dead.labels(name).set(_number(view.get("dead")))
            metrics.outbox_oldest.labels(name).set(_number(view.get("oldest_pending_age")))
            metrics.sink_up.labels(name).set(1 if view.get("health") == "ok" else 0)
        metrics.tracked.clear()
        for status, count in self._daemon.tracked_counts().items():
            metrics.tracked.labels(status).set(count)

    # -- control API -------------------------------------------------------------------------------

    async def _status(self, _: web.Request) -> web.Response:
        ready, detail = self._daemon.readiness()
        body = {
            "status_line": self._daemon.status_line(),
            "ready": ready,
            "reasons": detail.get("reasons", []),
            "sinks": self._daemon.sink_views(),
            "tracked": self._daemon.tracked_counts(),
        }
        return web.json_response(body)

    async def _list(self, _: web.Request) -> web.Response:
        text = await asyncio.to_thread(self._listing, self._daemon.store.path, self._daemon.source)
        return web.Response(text=text, content_type="application/json")

    def _listing(self, path: Path, source: str) -> str:
        """GET /v1/batches's body, built in a worker thread: thousands of rows would stall the poll loop."""
        data = [self._daemon.batch_view(b) for b in _read_rows(path, source, None)]
        return json.dumps({"object": "list", "data": data})

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        batch = self._daemon.store.batch(self._daemon.source, batch_id)
        if batch is None:
            return _not_tracked(batch_id)
        return web.json_response(self._daemon.batch_view(batch))

    async def _track(self, request: web.Request) -> web.Response:
        ids = _requested_ids(await request.read())
        added = set(self._daemon.track(ids, "api"))
        store, source = self._daemon.store, self._daemon.source
        views = [self._daemon.batch_view(b) for i in ids if (b := store.batch(source, i)) is not None]
        body = {
            "object": "list",
            "data": views,
            "added": [i for i in ids if i in added],
            "already_tracked": [i for i in ids if i not in added],
        }
        return web.json_response(body, status=201 if added else 200)

    async def _untrack(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if not self._daemon.untrack([batch_id]):
            return _not_tracked(batch_id)
        return web.json_response({"id": batch_id, "object": "batch", "deleted": True})


def _read_rows(path: Path, source: str, states: list[str] | None) -> list[TrackedBatch]:
    """One source's rows, read (in a worker thread) through a read-only connection of its own.

    The daemon's connection belongs to the event loop; the store is in WAL mode, so this reader sees the
    last commit and never blocks the daemon's writes.
    """
    with Store(path, readonly=True) as store:
        return store.batches(source, states)


def _requested_ids(raw: bytes) -> list[str]:
    """The ids of a POST /v1/batches body, de-duplicated in order; raises BadRequestError."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequestError('the body must be JSON: {"id": "batch_..."} or {"ids": ["batch_...", ...]}') from None
    if not isinstance(body, dict) or len(body) != 1 or not ({"id", "ids"} & body.keys()):
        raise BadRequestError('the body must be exactly one of {"id": "batch_..."} or {"ids": [...]}')
    ids: Any = [body["id"]] if "id" in body else body["ids"]
    if not isinstance(ids, list) or not ids:
        raise BadRequestError("ids must be a non-empty list of batch ids")
    if len(ids) > MAX_IDS:
        raise BadRequestError(f"at most {MAX_IDS} ids per request")
    for batch_id in ids:
        if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
            raise BadRequestError(f"not a batch id: {batch_id!r} (1-128 of A-Z a-z 0-9 _ -)")
    return list(dict.fromkeys(ids))


def _with_status(ok: bool, detail: dict[str, object]) -> dict[str, object]:
    body: dict[str, object] = {"status": "ok" if ok else "fail"}
    body.update((k, v) for k, v in detail.items() if k != "status")
    return body


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _not_tracked(batch_id: str) -> web.Response:
    return _error(404, f"batch {batch_id!r} is not tracked", "not_found")


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind}}, status=status, headers=headers)


__all__ = ["BatchStore", "Service", "ServiceBackend"]
