"""The HTTP service: health probes, Prometheus metrics, the control API and the live event stream, on
`[service] listen`.

`/healthz`, `/readyz` and `/metrics` are always open (probes and Prometheus carry no credentials);
every `/v1/*` route requires `Authorization: Bearer <token>` when `service.token_env`/`token_file` is set
(`/v1/events` also takes it as `?token=`, since a browser's EventSource cannot send headers).
The service reads the daemon only through `ServiceBackend`, so this module never imports the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, Self

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from poller.config import ServiceConfig, read_secret
from poller.errors import ConfigError
from poller.metrics import Metrics
from poller.service.dashboard import Dashboard
from poller.service.requests import (
    BadRequestError,
    error,
    not_tracked,
    number,
    query_source,
    requested_ids,
    stream_request,
    with_status,
)
from poller.service.stream import EventStream
from poller.store.base import EventLog, LoggedEvent

log = structlog.get_logger("poller.service")

#: Requests are short, so a stopping service waits only this long for the ones in flight.
SHUTDOWN_GRACE = 2.0
#: The control API's paths; everything under it needs the token when one is configured.
CONTROL_PREFIX = "/v1/"
#: The Server-Sent Events stream of recorded events.
EVENTS_PATH = "/v1/events"
#: A stream with nothing to send writes a comment this often, so proxies and clients see it is alive.
HEARTBEAT = 15.0
#: What a stream tells EventSource to wait before reconnecting (milliseconds).
RETRY_MS = 3000
#: A stream client that has not taken a frame for this long is dropped (it resumes from its Last-Event-ID).
WRITE_TIMEOUT = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ServiceBackend(Protocol):
    """Everything the service uses of the daemon; `poller.runtime.control.DaemonControl` implements it.

    Methods that take `source` accept None for "the only source" (reads: every source); an unknown or
    ambiguous source raises `ConfigError`, which the service answers with 400.
    """

    @property
    def metrics(self) -> Metrics: ...

    @property
    def event_log(self) -> EventLog: ...

    def watch_recordings(self, listener: Callable[[int | None], None]) -> Callable[[], None]:
        """Call `listener(position)` after each recording (None when another process wrote) until the
        returned function is called; the listener must not block."""
        ...

    def liveness(self) -> tuple[bool, dict[str, object]]: ...

    def readiness(self) -> tuple[bool, dict[str, object]]: ...

    def tracked_counts(self) -> dict[str, dict[str, int]]: ...

    def stalled_counts(self) -> dict[str, int]: ...

    async def status(self) -> dict[str, Any]: ...

    async def sink_views(self) -> dict[str, dict[str, object]]: ...

    async def batches(self, source: str | None) -> list[dict[str, Any]]: ...

    async def batch(self, source: str | None, batch_id: str) -> dict[str, Any] | None: ...

    async def track(
        self, ids: list[str], origin: str, source: str | None
    ) -> tuple[list[str], list[dict[str, Any]]]: ...

    async def untrack(self, ids: list[str], source: str | None) -> list[str]: ...


class Service:
    """Serves the endpoints while entered; `__aexit__` stops accepting and closes every connection.

    Construction reads the bearer token (raising `ConfigError` if it is configured but missing), so a
    bad secret fails before anything binds. Binding failures also raise `ConfigError` naming `service.listen`.
    """

    def __init__(
        self,
        backend: ServiceBackend,
        config: ServiceConfig,
        *,
        environ: dict[str, str] | None = None,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self._backend = backend
        self._config = config
        self._heartbeat = heartbeat
        self._stream: EventStream | None = None
        self._unwatch: Callable[[], None] | None = None
        self._token: bytes | None = None
        if config.has_token:
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

    @property
    def stream_clients(self) -> int:
        """How many `/v1/events` streams are open."""
        return self._stream.clients if self._stream is not None else 0

    async def __aenter__(self) -> Self:
        stream = EventStream(self._backend.event_log)
        await stream.start()
        self._stream = stream
        self._unwatch = self._backend.watch_recordings(stream.notify)
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._config.host, self._config.port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self._close_stream()
            raise ConfigError(
                "service.listen",
                f"cannot listen on {self._config.listen}: {exc.strerror or exc}",
                "choose a free port and an address of this host, or set service.enabled = false",
                self._config.listen,
            ) from None
        except BaseException:
            await runner.cleanup()
            await self._close_stream()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("service listening", url=self.url, control_api_auth=self._token is not None)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        runner, self._runner = self._runner, None
        await self._close_stream()  # first: open streams end, so the runner's cleanup need not wait for them
        if runner is not None:
            await runner.cleanup()

    async def _close_stream(self) -> None:
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    # -- the application ---------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        router = app.router
        dashboard = Dashboard()
        router.add_get("/", dashboard.index)
        router.add_get("/static/{name}", dashboard.asset)
        router.add_get("/healthz", self._healthz)
        router.add_get("/readyz", self._readyz)
        router.add_get("/metrics", self._metrics)
        router.add_get("/v1/status", self._status)
        router.add_get(EVENTS_PATH, self._events, allow_head=False)
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
            return error(
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
            return error(exc.status, message, kind, {"Allow": allow} if allow else None)
        except BadRequestError as exc:
            return error(400, str(exc), "invalid_request_error")
        except ConfigError as exc:  # an unknown or ambiguous source
            return error(400, f"{exc.problem}; {exc.fix}", "invalid_request_error")
        except Exception:
            log.exception("service request failed", method=request.method, path=request.path)
            return error(500, "internal error; see the batch-poller log", "server_error")

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        if request.path == EVENTS_PATH and "token" in request.query and "Authorization" not in request.headers:
            return self._matches(request.query["token"])
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return self._matches(given.strip()) and scheme.lower() == "bearer"

    def _matches(self, given: str) -> bool:
        assert self._token is not None
        # compare_digest runs in time independent of where the bytes differ.
        return hmac.compare_digest(given.encode("utf-8", "backslashreplace"), self._token)

    # -- probes and metrics ------------------------------------------------------------------------

    async def _healthz(self, _: web.Request) -> web.Response:
        ok, detail = self._backend.liveness()
        return web.json_response(with_status(ok, detail), status=200 if ok else 503)

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, detail = self._backend.readiness()
        body = with_status(ok, detail)
        body.setdefault("reasons", [])
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        await self._refresh_gauges()
        # The registry is thread-safe; rendering a large one should not stall the poll loop.
        body = await asyncio.to_thread(generate_latest, self._backend.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _refresh_gauges(self) -> None:
        """Set the gauges that are computed on demand (outbox depth and age, sink health, tracked and stalled)."""
        metrics = self._backend.metrics
        for name, view in (await self._backend.sink_views()).items():
            metrics.outbox_pending.labels(name).set(number(view.get("pending")))
            metrics.outbox_dead.labels(name).set(number(view.get("dead")))
            metrics.outbox_oldest.labels(name).set(number(view.get("oldest_pending_age")))
            metrics.sink_up.labels(name).set(1 if view.get("health") == "ok" else 0)
        metrics.tracked.clear()
        for source, counts in self._backend.tracked_counts().items():
            for status, count in counts.items():
                metrics.tracked.labels(source, status).set(count)
        metrics.stalled.clear()  # a source handed to another replica stops being reported here
        for source, count in self._backend.stalled_counts().items():
            metrics.stalled.labels(source).set(count)

    # -- control API -------------------------------------------------------------------------------

    async def _status(self, _: web.Request) -> web.Response:
        body = await self._backend.status()
        if self._stream is not None:  # where the event log is: a client may replay the last few events
            body["events"] = {"position": self._stream.head, "stream_clients": self._stream.clients}
        return web.json_response(body)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: each recorded event as `id: <position>`, `event: <type>`, `data: <JSON>`."""
        filters, since = stream_request(request)
        stream = self._stream
        if stream is None:
            raise web.HTTPServiceUnavailable
        end = await stream.start_position()
        cursor = end if since is None else min(since, end)  # beyond the end: a log started afresh
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: pass frames through as they come
            }
        )
        await response.prepare(request)
        stream.clients += 1
        try:
            await self._send(response, f"retry: {RETRY_MS}\n\n".encode())
            async with contextlib.aclosing(stream.follow(cursor, filters, self._heartbeat)) as follow:
                async for events in follow:
                    frames = b"".join(frame(e) for e in events)
                    await self._send(response, frames or b": keep-alive\n\n")
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or stopped reading: it resumes with Last-Event-ID
        except Exception:  # the headers are sent: end the stream, the client resumes with Last-Event-ID
            log.exception("event stream failed", path=request.path)
        finally:
            stream.clients -= 1
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, data: bytes) -> None:
        await asyncio.wait_for(response.write(data), WRITE_TIMEOUT)

    async def _list(self, request: web.Request) -> web.Response:
        data = await self._backend.batches(query_source(request))
        return web.json_response({"object": "list", "data": data})

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        view = await self._backend.batch(query_source(request), batch_id)
        if view is None:
            return not_tracked(batch_id)
        return web.json_response(view)

    async def _track(self, request: web.Request) -> web.Response:
        ids, source = requested_ids(await request.read())
        added, views = await self._backend.track(ids, "api", source or query_source(request))
        added_set = set(added)
        body = {
            "object": "list",
            "data": views,
            "added": added,
            "already_tracked": [v["id"] for v in views if v["id"] not in added_set],
        }
        return web.json_response(body, status=201 if added else 200)

    async def _untrack(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if not await self._backend.untrack([batch_id], query_source(request)):
            return not_tracked(batch_id)
        return web.json_response({"id": batch_id, "object": "batch", "deleted": True})


def frame(event: LoggedEvent) -> bytes:
    """One Server-Sent Events frame. Canonical JSON is one line; were a payload ever several, each line
    would go in a `data:` field of its own, which clients join back with newlines."""
    data = b"\ndata: ".join(event.payload.splitlines())
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.position, event.type.encode(), data)


__all__ = ["Service", "ServiceBackend"]
