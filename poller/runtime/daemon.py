"""The composition root: opens the store, the sinks and their delivery workers, one runner per source
and the HTTP service, then supervises them until told to stop.

The daemon owns no signals: the `run` command installs handlers that call `stop` and
`request_reload`, so the daemon can be embedded (as arq's worker with `handle_signals=False`).

Where a transition becomes an event: `poller.polling.recorder.Recorder`. Where an event leaves the
process: `poller.delivery.worker.DeliveryWorker` -> `Sink.send`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from poller.aio import wait_event
from poller.config import Config, SourceConfig
from poller.delivery.routing import Routes
from poller.errors import ConfigError
from poller.metrics import Metrics
from poller.polling.recorder import Recorder
from poller.polling.runner import SourceRunner
from poller.runtime import heap
from poller.runtime.leasing import LeaseKeeper
from poller.runtime.notify import Notifier, watchdog_loop
from poller.runtime.reload import Reloader
from poller.runtime.sinkset import SinkSet
from poller.sinks.registry import build_sink
from poller.store import open_store
from poller.store.base import Recorded, Store, default_replica_name

if TYPE_CHECKING:
    from poller.service.app import Service

log = structlog.get_logger("poller.daemon")

#: The housekeeping loop ticks this often (status line, reloads, liveness).
TICK = 1.0
#: This long without a housekeeping tick means the event loop is stuck.
LOOP_STALL = 30.0
#: After the store's change feed failed, try again this much later (seconds).
CHANGES_RETRY = 1.0


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
        settle_heap: bool = False,
    ) -> None:
        self.config = config
        #: Freeze the heap once started (`poller.runtime.heap`): the `run` command's process does; an
        #: embedding process (the tests) keeps its collector as it is.
        self.settle_heap = settle_heap
        self.config_path = config_path
        self.environ = dict(os.environ) if environ is None else environ
        self.clock = clock
        self.rand = rand
        self.metrics = metrics or Metrics()
        self.notifier = notifier if notifier is not None else Notifier.from_env(self.environ)
        #: One runner per configured source; with replicas, only those whose lease this one holds poll.
        self.runners: dict[str, SourceRunner] = {}
        self.replica_name = config.state.replica_name or default_replica_name()
        #: Set when the store is shared (PostgreSQL): sources are polled under per-source leases.
        self.leasing: LeaseKeeper | None = None
        self.exit_code = 0
        self.ready = asyncio.Event()
        self.service: Service | None = None
        self._store: Store | None = None
        self._sinks: SinkSet | None = None
        self._recorder: Recorder | None = None
        self._stop = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reload_requested = False
        self._last_status = ""
        self.loop_tick = 0.0
        self.store_open = False
        self.reloader = Reloader(self)
        #: Called with the event log's position after each recording (None: another process wrote).
        self.recording_listeners: list[Callable[[int | None], None]] = []

    # -- what others use -----------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        assert self._store is not None, "the daemon is not running"
        return self._store

    @property
    def sinks(self) -> SinkSet:
        assert self._sinks is not None, "the daemon is not running"
        return self._sinks

    @property
    def recorder(self) -> Recorder:
        assert self._recorder is not None, "the daemon is not running"
        return self._recorder

    def stop(self) -> None:
        """Ask the daemon to shut down (what SIGTERM and SIGINT do)."""
        self._stop.set()

    def request_reload(self) -> None:
        """Re-read the config at the next tick (what SIGHUP does)."""
        self._reload_requested = True

    def polling(self) -> list[str]:
        """The sources this process polls: every one, or with replicas those whose lease it holds."""
        return [name for name in self.runners if f"poller.source[{name}]" in self._tasks]

    def runner(self, source: str | None) -> SourceRunner:
        """The runner of `source`, or the only one when `source` is None; ConfigError when ambiguous."""
        if source is None:
            if len(self.runners) == 1:
                return next(iter(self.runners.values()))
            raise ConfigError("source", "more than one source is configured", f"name one of: {', '.join(self.runners)}")
        try:
            return self.runners[source]
        except KeyError:
            raise ConfigError(
                "source", f"no source named {source!r}", f"name one of: {', '.join(self.runners)}"
            ) from None

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            async with AsyncExitStack() as stack:
                state = open_store(self.config.state, self.environ, name=self.replica_name)
                self._store = await stack.enter_async_context(state)
                self.store_open = True
                if self.config.state.url is not None:  # a shared store: replicas split the sources
                    structlog.contextvars.bind_contextvars(replica=self.replica_name)
                    self.leasing = LeaseKeeper(
                        self.store,
                        self.replica_name,
                        self.config.state.lease_ttl,
                        sources=lambda: list(self.runners),
                        start=self._start_polling,
                        stop=self._stop_polling,
                        clock=self.clock,
                        metrics=self.metrics,
                    )
                self._sinks = SinkSet(
                    self.store, self.metrics, on_crash=self._crashed, clock=self.clock, rand=self.rand
                )
                stack.push_async_callback(self._close_sinks)
                for name, sink_config in self.config.named_sinks().items():
                    await self.sinks.open(name, sink_config, build_sink(name, sink_config, self.environ))
                self._recorder = Recorder(
                    self.store, Routes(self.config.named_sinks()), self.metrics, on_recorded=self._recorded
                )
                for source_config in self.config.named_sources().values():
                    self.add_runner(source_config)
                if self.config.service.enabled:
                    from poller.runtime.control import DaemonControl  # noqa: PLC0415 - imports this module
                    from poller.service.app import Service  # noqa: PLC0415 - aiohttp.web loads only when serving

                    self.service = await stack.enter_async_context(
                        Service(DaemonControl(self), self.config.service, environ=self.environ)
                    )
                await self._serve()
        finally:
            self.notifier.close()
        return self.exit_code

    def add_runner(self, source_config: SourceConfig) -> SourceRunner:
        runner = SourceRunner(
            source_config,
            self.config.poll,
            store=self.store,
            recorder=self.recorder,
            metrics=self.metrics,
            environ=self.environ,
            clock=self.clock,
            rand=self.rand,
        )
        self.runners[runner.name] = runner
        if self._tasks:  # serving already: start it now (with replicas, once its lease is taken)
            if self.leasing is None:
                self._supervise(f"poller.source[{runner.name}]", runner.run())
            else:
                self.leasing.wake()
        return runner

    async def remove_runner(self, name: str) -> None:
        if self.leasing is not None:
            await self.leasing.forget(name)  # stops its polling (saving its pace) and frees its lease at once
            self.runners.pop(name)
            return
        runner = self.runners.pop(name)
        task = self._tasks.pop(f"poller.source[{name}]", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await runner.close()

    async def _start_polling(self, name: str) -> None:
        """This replica took `name`'s lease: poll it, from the store's rows (another replica polled it)."""
        runner = self.runners.get(name)
        if runner is None:  # removed by a reload meanwhile
            return
        runner.tracker.clear()
        runner.loaded.clear()
        runner.loop_tick = time.monotonic()  # not "stuck" while it loads
        self._supervise(f"poller.source[{name}]", runner.run())

    async def _stop_polling(self, name: str, save: bool = True) -> None:
        """`name`'s lease is given up or lost: stop its loop; `save` keeps its batches' pace for the next
        holder (not when the lease was lost: the new holder's schedule is the one that counts)."""
        key = f"poller.source[{name}]"
        task = self._tasks.get(key)
        if task is None:
            return
        while not task.done():  # a cancellation swallowed by a library must not hang the hand-over
            task.cancel()
            await asyncio.wait((task,), timeout=1.0)
        self._tasks.pop(key, None)  # only now: a shutdown cancelling this very wait still sees the task
        runner = self.runners.get(name)
        if runner is not None and save:
            try:
                await runner.close()
            except Exception:  # the store is unreachable: the next holder starts from the last saved pace
                log.warning("could not save the schedule of a source", source=name, exc_info=True)

    def _recorded(self, recorded: Recorded) -> None:
        workers = self.sinks.workers
        for row in recorded.heads:  # new queue heads go to their worker in memory: no outbox read-back
            worker = workers.get(row.sink)
            if worker is not None:
                worker.offer(row)
        self.sinks.wake()
        for listener in self.recording_listeners:
            listener(recorded.position or None)

    def _supervise(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """A supervised task only ends when cancelled: anything else stops the daemon with exit 1."""
        if task.cancelled() or self._stop.is_set():
            return
        error = task.exception()
        log.error("a daemon task ended; shutting down", task=task.get_name(), exc_info=error)
        self._crashed(error or RuntimeError(f"{task.get_name()} returned"))

    def _crashed(self, error: BaseException) -> None:
        del error
        self.exit_code = 1  # so that systemd's Restart=on-failure brings it back
        self.stop()

    async def _serve(self) -> None:
        self.sinks.start()
        if self.leasing is None:
            for name, runner in self.runners.items():
                self._supervise(f"poller.source[{name}]", runner.run())
        else:
            await self.leasing.round()  # the sources this replica polls from the start
            self._supervise("poller.leasing", self.leasing.run())
        self._supervise("poller.changes", self._watch_changes())
        self._supervise("poller.housekeeping", self._housekeeping())
        watchdog = asyncio.create_task(watchdog_loop(self.notifier, lambda: self.liveness()[0]), name="poller.watchdog")
        stop = asyncio.create_task(self._stop.wait(), name="poller.stop_wait")
        loaded = asyncio.ensure_future(self._all_loaded())
        await asyncio.wait([loaded, stop], return_when=asyncio.FIRST_COMPLETED)
        if not self._stop.is_set():
            self.ready.set()
            self.notifier.ready()
            self._publish_status()
            log.info(
                "batch-poller started",
                sources={n: r.provider_name for n, r in self.runners.items()},
                polling=self.polling(),
                tracking=sum(len(self.runners[n].tracker.active()) for n in self.polling()),
                sinks=list(self.sinks.workers),
                state=self.store.description,
                listen=self.config.service.listen if self.config.service.enabled else None,
            )
            if self.settle_heap:
                log.debug("heap settled", frozen=heap.settle())
        await stop
        loaded.cancel()
        self.notifier.stopping()
        log.info("shutting down", deadline=self.config.service.shutdown_timeout)
        if self.leasing is not None:
            # Stop polling and release every lease first, so the other replicas take over at once.
            keeper = self._tasks.pop("poller.leasing", None)
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            await self.leasing.close()
        polled = self.polling()
        tasks = [*self._tasks.values(), watchdog]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        # In-flight deliveries get the deadline; whatever is left stays in the outbox for the next start.
        await self._close_sinks()
        await asyncio.gather(*(self.runners[n].close() for n in polled), return_exceptions=True)
        log.info("stopped")

    async def _all_loaded(self) -> None:
        await asyncio.gather(*(self.runners[n].loaded.wait() for n in self.polling()))

    async def _close_sinks(self) -> None:
        if self._sinks is not None:
            await self._sinks.close_all(self.config.service.shutdown_timeout)

    async def _watch_changes(self) -> None:
        """Another process wrote (the CLI tracked batches, `redeliver` re-queued rows): catch up.

        A store error (the database restarting) is logged and the watch starts again: it must not end
        the daemon, whose poll loops and deliveries go on meanwhile.
        """
        while True:
            try:
                async for _ in self.store.changes():
                    await self._caught_up()
            except Exception:
                log.warning("watching the store for other writers failed; retrying", exc_info=True)
                await asyncio.sleep(CHANGES_RETRY)

    async def _caught_up(self) -> None:
        for worker in self.sinks.workers.values():
            worker.forget_offers()  # e.g. `redeliver` put an earlier row ahead of a handed-over one
        self.sinks.wake()
        for listener in self.recording_listeners:
            listener(None)
        if self.leasing is not None:
            self.leasing.wake()  # perhaps another replica released its leases
        for name in self.polling():
            runner = self.runners.get(name)  # a reload may have removed it meanwhile
            if runner is not None:
                await runner.reload_tracked()

    async def _housekeeping(self) -> None:
        while not self._stop.is_set():  # once stopping, return: waiting on a set event would spin
            self.loop_tick = time.monotonic()
            if self._reload_requested:
                self._reload_requested = False
                await self.reloader.reload()
            self._publish_status()
            await wait_event(self._stop, TICK)

    def _publish_status(self) -> None:
        line = self.status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    # -- what the service endpoint and systemd are told ------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Alive while the housekeeping loop ticks and every runner ticks or its requests progress."""
        now = time.monotonic()
        age = now - self.loop_tick if self.loop_tick else None
        runners = {n: self.runners[n] for n in self.polling()}
        stuck = [name for name, r in runners.items() if r.loaded.is_set() and not r.alive(now)]
        ok = age is not None and age < LOOP_STALL and not stuck
        return ok, {"loop_tick_age": None if age is None else round(age, 3), "stuck_sources": stuck}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when the store is open and every source's API works (credentials, base_url, recent polls)."""
        reasons = [] if self.store_open else ["state store is not open"]
        polling = self.polling()
        for name in polling:
            reasons += self.runners[name].readiness()
        last = {n: self.runners[n].health.last_success for n in polling}
        return not reasons, {"reasons": reasons, "last_success": last}

    def status_line(self) -> str:
        """One line for systemd's STATUS=: tracking, each source's API health and each failing sink."""
        polling = self.polling()
        total = sum(len(self.runners[n].tracker.active()) for n in polling)
        parts = [f"tracking {total} batches"]
        if self.leasing is not None:
            parts.append(f"replica {self.replica_name} polls {', '.join(polling) or 'no source'}")
        for name in polling:
            health = self.runners[name].health
            if health.auth_failing:
                parts.append(f"{name}: API REJECTS CREDENTIALS")
            elif health.misconfigured:
                parts.append(f"{name}: API MISCONFIGURED")
            elif health.api_failing_since is not None:
                parts.append(f"{name}: API unreachable")
        if self._sinks is not None:
            parts += self._sinks.status_parts()
        return "; ".join(parts)

    def tracked_counts(self) -> dict[str, dict[str, int]]:
        """Active batches by status of each source this process polls (replicas: sum over all of them)."""
        return {name: self.runners[name].tracked_counts() for name in self.polling()}

    def stalled_counts(self) -> dict[str, int]:
        return {name: self.runners[name].stalled_count() for name in self.polling()}
