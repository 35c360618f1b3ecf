"""The composition root: builds the store, the API client, the sinks and their delivery workers, and runs
the poll loop until told to stop.

Where a transition becomes an event: `Tracker.observe` (pure) → `Store.save` (one transaction with the
outbox rows). Where an event leaves the process: `DeliveryWorker` → `Sink.send`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from poller.api import BatchApi
from poller.config import Config, SinkConfig, load_config
from poller.delivery import DeliveryWorker, route
from poller.errors import ConfigError
from poller.events import encode
from poller.logs import configure
from poller.metrics import Metrics
from poller.models import Batch
from poller.notify import Notifier, watchdog_loop
from poller.records import ACTIVE, NewEvent, TrackedBatch
from poller.refresh import Health, Refresher
from poller.schedule import Intervals, Pacer
from poller.sinks.base import Sink
from poller.sinks.file import FileSink
from poller.sinks.stdout import StdoutSink
from poller.store import Store
from poller.tracker import Backoff, Tracker
from poller.transitions import Policy, pruned_event

if TYPE_CHECKING:
    from poller.service import Service

log = structlog.get_logger("poller.daemon")

PRUNE_EVERY = 600.0
#: The poll loop ticks at least every second; this long without a tick means it is stuck.
LOOP_STALL = 30.0


def build_sink(name: str, config: SinkConfig, environ: dict[str, str]) -> Sink:
    """The sink object for one `[[sinks]]` entry."""
    if config.kind == "stdout":
        return StdoutSink(name, text=config.format == "text", max_in_flight=config.max_in_flight)
    if config.kind == "file":
        return FileSink(name, config.path, max_in_flight=config.max_in_flight)
    if config.kind == "mqtt":
        from poller.sinks.mqtt import MqttSink  # noqa: PLC0415 - aiomqtt loads only when configured

        return MqttSink(name, config, environ=environ)
    from poller.sinks.webhook import WebhookSink  # noqa: PLC0415

    return WebhookSink(name, config, environ=environ)


def tracker_settings(config: Config) -> tuple[Intervals, Policy, Backoff]:
    poll = config.poll
    intervals = Intervals(
        poll.base_intervals(), growth=poll.growth, max_interval=poll.max_interval, default=poll.in_progress
    )
    policy = Policy(
        progress=poll.progress,
        progress_interval=poll.progress_interval,
        stall_after=poll.stall_after,
        expiry_warning=poll.expiry_warning,
    )
    return intervals, policy, Backoff(poll.error_backoff, poll.max_error_backoff, poll.gone_after)


class Daemon:
    """One running batch-poller. `run` returns the process exit code."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        environ: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.environ = dict(os.environ) if environ is None else environ
        self.clock = clock
        self.rand = rand
        self.metrics = metrics or Metrics()
        self.source = config.source.source_name
        intervals, policy, backoff = tracker_settings(config)
        self.tracker = Tracker(
            self.source, intervals=intervals, policy=policy, backoff=backoff, router=self._route, rand=rand
        )
        self.health = Health()
        self.workers: dict[str, DeliveryWorker] = {}
        self._sink_configs = config.named_sinks()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._store: Store | None = None
        self._api: BatchApi | None = None
        self._refresher: Refresher | None = None
        self._cycle: asyncio.Task[None] | None = None
        self._cycle_started = 0.0
        self.exit_code = 0
        self._pacer = Pacer(config.poll.max_requests_per_second)
        self._data_version = -1
        self._next_prune = 0.0
        self._api_stack: AsyncExitStack | None = None
        self._sink_stacks: dict[str, AsyncExitStack] = {}
        self._worker_tasks: dict[str, asyncio.Task[None]] = {}
        self._serving = False
        self._reload_requested = False
        self._last_status = ""
        self.notifier = notifier if notifier is not None else Notifier.from_env(self.environ)
        self.service: Service | None = None
        self.ready = asyncio.Event()

    # -- public surface ----------------------------------------------------------------------------

    @property
    def refresher(self) -> Refresher:
        assert self._refresher is not None, "the daemon is not running"
        return self._refresher

    def _wake_workers(self) -> None:
        for worker in self.workers.values():
            worker.wake()

    @property
    def store(self) -> Store:
        assert self._store is not None, "the daemon is not running"
        return self._store

    def stop(self) -> None:
        """Ask the daemon to shut down (what SIGTERM and SIGINT do)."""
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Re-read the tracked set now (after a track or untrack from elsewhere)."""
        self._data_version = -1
        self._wake.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            async with AsyncExitStack() as stack:
                self._store = stack.enter_context(Store(self.config.state.db_path(self.environ)))
                self.health.store_open = True
                self._refresher = Refresher(
                    self.config,
                    self.tracker,
                    self.store,
                    self.metrics,
                    clock=self.clock,
                    on_enqueued=self._wake_workers,
                    health=self.health,
                )
                self._track_configured()
                stack.push_async_callback(self._close_api)
                await self._open_api()
                stack.push_async_callback(self._close_sinks)
                for name, sink_config in self._sink_configs.items():
                    await self._open_sink(name, build_sink(name, sink_config, self.environ))
                if self.config.service.enabled:
                    from poller.service import Service  # noqa: PLC0415 - aiohttp.web loads only when serving

                    self.service = await stack.enter_async_context(
                        Service(self, self.config.service, environ=self.environ)
                    )
                await self._serve()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.notifier.close()
        return self.exit_code

    def request_reload(self) -> None:
        """Re-read the config at the next turn of the poll loop (what SIGHUP does)."""
        self._reload_requested = True
        self._wake.set()

    async def _open_api(self) -> None:
        # One pacer for the daemon's life, so a reload never forgets a Retry-After pause.
        self._pacer.configure(self.config.poll.max_requests_per_second)
        stack = AsyncExitStack()
        self._api = await stack.enter_async_context(
            BatchApi(
                self.config.source,
                self.config.source.api_key(self.environ),
                metrics=self.metrics,
                pacer=self._pacer,
                max_concurrency=self.config.poll.max_concurrency,
            )
        )
        self._api_stack = stack
        self.refresher.api = self._api

    async def _close_api(self) -> None:
        if self._api_stack is not None:
            await self._api_stack.aclose()
            self._api_stack = self._api = None
            self.refresher.api = None

    async def _open_sink(self, name: str, sink: Sink) -> None:
        stack = AsyncExitStack()
        await stack.enter_async_context(sink)
        worker = DeliveryWorker(self.store, sink, self.metrics, clock=self.clock, rand=self.rand)
        self.workers[name] = worker
        self._sink_stacks[name] = stack
        self.metrics.sink_up.labels(name).set(1)
        if self._serving:
            self._start_worker(name, worker)

    def _start_worker(self, name: str, worker: DeliveryWorker) -> None:
        task = asyncio.create_task(worker.run(), name=f"poller.delivery[{name}]")
        task.add_done_callback(self._worker_ended)
        self._worker_tasks[name] = task

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """A delivery worker must only end when told to: a crash stops the daemon (exit 1, systemd restarts)."""
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("a delivery worker crashed; shutting down", task=task.get_name(), exc_info=error)
            self.exit_code = 1
            self.stop()

    async def _close_sink(self, name: str) -> None:
        """Stop one sink: in-flight sends get the shutdown deadline; its rows stay in the outbox."""
        worker = self.workers.get(name)
        if worker is not None:
            await worker.stop(self.config.service.shutdown_timeout)
            self.workers.pop(name, None)
        task = self._worker_tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stack = self._sink_stacks.pop(name, None)
        if stack is not None:
            await stack.aclose()

    async def _close_sinks(self) -> None:
        await asyncio.gather(*(self._close_sink(name) for name in list(self.workers)), return_exceptions=True)

    async def _serve(self) -> None:
        self._serving = True
        for name, worker in self.workers.items():
            self._start_worker(name, worker)
        poll = asyncio.create_task(self._poll_loop(), name="poller.poll_loop")
        watchdog = asyncio.create_task(watchdog_loop(self.notifier, lambda: self.liveness()[0]), name="poller.watchdog")
        self.health.loop_tick = time.monotonic()
        self.ready.set()
        self.notifier.ready()
        self._publish_status()
        log.info(
            "batch-poller started",
            source=self.source,
            tracking=len(self.tracker.active()),
            sinks=list(self.workers),
            state=str(self.store.path),
            listen=self.config.service.listen if self.config.service.enabled else None,
        )
        stop = asyncio.create_task(self._stop.wait(), name="poller.stop_wait")
        # The watchdog task ends at once when systemd set no watchdog, so it is not waited on here.
        done, _ = await asyncio.wait([poll, stop], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop and not task.cancelled() and task.exception() is not None:
                log.error("a daemon task crashed; shutting down", task=task.get_name(), exc_info=task.exception())
                self.exit_code = 1  # so that systemd's Restart=on-failure brings it back
        self._stop.set()
        self.notifier.stopping()
        log.info("shutting down", deadline=self.config.service.shutdown_timeout)
        for task in (poll, stop, watchdog):
            task.cancel()
        await asyncio.gather(poll, stop, watchdog, return_exceptions=True)
        # In-flight deliveries get the deadline; whatever is left stays in the outbox for the next start.
        await self._close_sinks()
        self.store.save_schedule(self.tracker.active())
        log.info("stopped")

    def _publish_status(self) -> None:
        line = self.status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    # -- reload ------------------------------------------------------------------------------------

    async def _reload(self) -> None:
        """Apply a re-read config; one that is invalid, or names a sink that cannot be built, changes nothing."""
        self._reload_requested = False
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            new.check_secrets(self.environ)
            self._check_reloadable(new)
            sink_configs = new.named_sinks()
            # Build every new or changed sink before touching the running ones: construction validates.
            built = {
                name: build_sink(name, cfg, self.environ)
                for name, cfg in sink_configs.items()
                if self._sink_configs.get(name) != cfg
            }
        except Exception as exc:
            problem = exc.render() if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("config reload rejected; still running the previous config", error=problem)
            self.notifier.ready()
            return
        try:
            await self._apply_config(new, sink_configs, built)
        except Exception:
            log.exception("config reload failed part-way; running with what was applied")
        self.wake()
        self.notifier.ready()
        log.info("config reloaded", sinks=list(self.workers), tracking=len(self.tracker.active()))

    async def _apply_config(self, new: Config, sink_configs: dict[str, SinkConfig], built: dict[str, Sink]) -> None:
        old, self.config = self.config, new
        self.refresher.config = new
        self.refresher.next_discover = 0.0
        intervals, policy, backoff = tracker_settings(new)
        self.tracker.intervals, self.tracker.policy, self.tracker.backoff = intervals, policy, backoff
        self._track_configured()
        if new.log != old.log:
            configure(new.log.level, new.log.format)
        if new.source != old.source:
            # Perhaps a corrected key: try at once instead of waiting out an authentication pause.
            self.health.auth_paused_until, self.health.auth_failures = 0.0, 0
            for batch in self.tracker.active():
                batch.next_due = min(batch.next_due, self.clock())
        api_keys = (new.source, new.poll.max_concurrency, new.poll.max_requests_per_second)
        if api_keys != (old.source, old.poll.max_concurrency, old.poll.max_requests_per_second):
            await self._close_api()
            await self._open_api()
        self._sink_configs = sink_configs
        # Concurrently: each may take the shutdown deadline to let its in-flight sends finish.
        await asyncio.gather(*(self._close_sink(n) for n in list(self.workers) if n not in sink_configs or n in built))
        for name, sink in built.items():
            await self._open_sink(name, sink)

    def _check_reloadable(self, new: Config) -> None:
        if new.state.db_path(self.environ) != self.store.path:
            raise ConfigError(
                "state.path", "cannot change while running", "restart the service to use another state file"
            )
        if new.source.source_name != self.source:
            raise ConfigError("source.name", "cannot change while running", "restart the service to rename the source")
        if new.service != self.config.service:
            raise ConfigError("service", "cannot change while running", "restart the service to rebind the endpoint")

    # -- what the service endpoint and systemd are told ------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Alive while the poll loop ticks and no fetch cycle hangs beyond its timeouts and any rate-limit pause."""
        now = time.monotonic()
        age = now - self.health.loop_tick if self.health.loop_tick else None
        ok = age is not None and age < LOOP_STALL
        cycle_age = None
        if self._cycle is not None:
            # A long cycle is fine while requests keep going out and coming back; a silent one is hung.
            api = self._api
            last = max(self._cycle_started, api.last_progress if api is not None else 0.0)
            cycle_age = now - last
            pause = max(api.pacer.paused_until - now, 0.0) if api is not None else 0.0
            ok = ok and cycle_age < max(LOOP_STALL, 2 * self.config.source.timeout) + pause
        return ok, {
            "loop_tick_age": None if age is None else round(age, 3),
            "cycle_age": None if cycle_age is None else round(cycle_age, 3),
        }

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when the store is open, the credentials are accepted and a poll succeeded recently."""
        reasons = []
        if not self.health.store_open:
            reasons.append("state store is not open")
        if self.health.auth_failing:
            reasons.append("the Batch API rejects the credentials")
        recent = max(3 * self.config.poll.max_interval, 60.0)
        last = self.health.last_success
        if self.tracker.active() and (last is None or self.clock() - last > recent):
            reasons.append(f"no successful poll in the last {recent:g}s")
        return not reasons, {"reasons": reasons, "last_success": last}

    def status_line(self) -> str:
        """One line for systemd's STATUS=: tracking, API health and each failing sink."""
        parts = [f"tracking {len(self.tracker.active())} batches"]
        if self.health.auth_failing:
            parts.append("API REJECTS CREDENTIALS")
        elif self.health.api_failing_since is not None:
            parts.append("API unreachable")
        for name, worker in self.workers.items():
            state = "disabled" if worker.disabled else worker.sink.health()
            if state != "ok" or worker.sink.__class__.__name__ == "MqttSink":
                parts.append(f"{name} {state}")
        return "; ".join(parts)

    def tracked_counts(self) -> dict[str, int]:
        """Actively tracked batches by status, from memory ("not yet polled" before the first answer)."""
        counts = Counter(b.knowledge.status or "not yet polled" for b in self.tracker.active())
        return dict(sorted(counts.items()))

    def track(self, ids: list[str], origin: str = "api") -> list[str]:
        """Start tracking ids now; returns those that were added."""
        added = self.store.track(self.source, ids, origin, self.clock())
        self.wake()
        return added

    def untrack(self, ids: list[str]) -> list[str]:
        removed = self.store.untrack(self.source, ids, self.clock())
        for batch_id in removed:
            self.tracker.batches.pop(batch_id, None)
        self.wake()
        return removed

    def batch_view(self, batch: TrackedBatch) -> dict[str, object]:
        """The control API's and `status`'s view of one tracked batch."""
        return {
            "id": batch.id,
            "source": batch.source,
            "state": batch.state,
            "status": batch.knowledge.status,
            "sequence": batch.knowledge.sequence,
            "request_counts": (batch.snapshot or {}).get("request_counts"),
            "created_at": batch.created_at,
            "updated_at": batch.updated_at,
            "next_poll_at": batch.next_due if batch.state == ACTIVE and math.isfinite(batch.next_due) else None,
            "error_streak": batch.error_streak,
            "origin": batch.origin,
            "batch": batch.snapshot,
        }

    def sink_views(self) -> dict[str, dict[str, object]]:
        stats = self.store.outbox_stats()
        now = self.clock()
        views: dict[str, dict[str, object]] = {}
        for name, worker in self.workers.items():
            entry = stats.get(name, {})
            oldest = entry.get("oldest_pending")
            views[name] = {
                "kind": self._sink_configs[name].kind,
                "health": "disabled" if worker.disabled else worker.sink.health(),
                "pending": entry.get("pending", 0),
                "dead": entry.get("dead", 0),
                "oldest_pending_age": None if oldest is None else round(now - oldest, 1),
                "in_flight": worker.in_flight,
                "delivered": worker.delivered,
            }
        return views

    # -- the poll loop -----------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        """Tick at least every second; fetching runs in a cycle task so a slow API never stalls the loop."""
        try:
            while not self._stop.is_set():
                self.health.loop_tick = time.monotonic()
                self._reap_cycle()
                if self._cycle is None:
                    if self._reload_requested:
                        await self._reload()
                    self._reload_tracked()
                    self._start_cycle()
                self._prune()
                self._publish_status()
                await self._idle()
        finally:
            if self._cycle is not None:
                self._cycle.cancel()
                await asyncio.gather(self._cycle, return_exceptions=True)

    def _start_cycle(self) -> None:
        now = self.clock()
        discover = self.config.source.discover and now >= self.refresher.next_discover
        due = self.tracker.due(now)
        if now < self.health.auth_paused_until or not (discover or due):
            return
        if due:
            self.metrics.poll_lag.set(max(now - due[0].next_due, 0.0))
        self._cycle = asyncio.create_task(self._run_cycle(due, discover=discover), name="poller.refresh_cycle")
        self._cycle_started = time.monotonic()
        self._cycle.add_done_callback(lambda _task: self._wake.set())

    async def _run_cycle(self, due: list[TrackedBatch], *, discover: bool) -> None:
        if discover:
            await self.refresher.discover()
        if due:
            await self.refresher.refresh(due)

    def _reap_cycle(self) -> None:
        """Forget a finished cycle; re-raise its error, which ends the daemon (systemd restarts it)."""
        if self._cycle is not None and self._cycle.done():
            cycle, self._cycle = self._cycle, None
            error = None if cycle.cancelled() else cycle.exception()
            if error is not None:
                raise error

    async def _idle(self) -> None:
        if self._cycle is not None:
            timeout = 1.0  # the cycle's end wakes us
        else:
            wake_at = max(self.tracker.next_due(), self.health.auth_paused_until)
            if self.config.source.discover:
                wake_at = min(wake_at, max(self.refresher.next_discover, self.health.auth_paused_until))
            timeout = min(max(wake_at - self.clock(), 0.0), 1.0)
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _track_configured(self) -> None:
        ids = list(self.config.source.track)
        if ids:
            added = self.store.track(self.source, ids, "config", self.clock())
            if added:
                log.info("tracking configured batches", count=len(added))

    def _reload_tracked(self) -> None:
        version = self.store.data_version()
        if version != self._data_version:
            # Another process wrote: tracked ids may have changed, and `redeliver` may have re-queued rows.
            self._data_version = version
            self._wake_workers()
            self.tracker.load(self.store.batches(self.source, states=[ACTIVE]))

    # -- retention ---------------------------------------------------------------------------------

    def _prune(self) -> None:
        now = self.clock()
        if now < self._next_prune:
            return
        # Prune a few times per retention period, but never more often than every second.
        self._next_prune = now + min(PRUNE_EVERY, max(self.config.poll.retention / 4, 1.0))
        for tracked in self.store.prune(now - self.config.poll.retention):
            self.tracker.batches.pop(tracked.id, None)
            if tracked.snapshot is None:
                continue
            try:
                batch = Batch.model_validate(tracked.snapshot)
            except ValueError:
                continue
            _, event = pruned_event(self.source, tracked.knowledge, batch, now)
            sinks = self._route(event.type, batch.metadata)
            if sinks:
                self.store.record_internal(
                    self.source,
                    tracked.id,
                    NewEvent(event.id, event.type, event.data.sequence, event.created_at, now, encode(event), sinks),
                    now,
                )
                self._wake_workers()

    def _route(self, event_type: str, metadata: dict[str, str] | None) -> list[str]:
        return route(event_type, metadata, self._sink_configs)
