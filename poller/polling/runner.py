"""One runner per source: it owns the source's tracker, pacer, health, discovery cursor and provider
connection, and polls in one task of its own, so sources never wait on each other.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import structlog

from poller.aio import wait_event
from poller.config.settings import PollConfig
from poller.config.sources import SourceConfig
from poller.domain.schedule import Intervals, Pacer, Rand
from poller.domain.transitions import Policy, pruned, stalled
from poller.errors import BadResponseError
from poller.metrics import Metrics
from poller.polling.discovery import Discovery
from poller.polling.health import SourceHealth
from poller.polling.recorder import Recorder
from poller.polling.refresh import Refresher, SourceContext
from poller.polling.tracker import Backoff, Tracker
from poller.providers import canonical_id, make_provider
from poller.store.base import ACTIVE, Store

log = structlog.get_logger("poller.runner")

#: Retention is applied a few times per retention period, at most this far apart.
PRUNE_EVERY = 600.0
#: The loop wakes at least this often, so a stuck one is told from an idle one.
TICK = 1.0
#: This long without a tick or any request progress means the runner is stuck.
STALL = 30.0


def tracker_settings(poll: PollConfig) -> tuple[Intervals, Policy, Backoff]:
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


class SourceRunner:
    """Polls one source until cancelled. `track`, `untrack` and `configure` may be called meanwhile."""

    def __init__(
        self,
        config: SourceConfig,
        poll: PollConfig,
        *,
        store: Store,
        recorder: Recorder,
        metrics: Metrics,
        environ: dict[str, str],
        clock: Callable[[], float] = time.time,
        rand: Rand,
    ) -> None:
        self.config = config
        self.poll = poll
        self.name = config.source_name
        self.store = store
        self.clock = clock
        self.environ = environ
        self.source_metrics = metrics.source(self.name)
        self.pacer = Pacer(self._rate())
        intervals, policy, backoff = tracker_settings(poll)
        self.tracker = Tracker(
            self.name,
            intervals=intervals,
            policy=policy,
            backoff=backoff,
            rand=rand,
            latency=poll.latency,
            rate=self._rate(),
        )
        self.health = SourceHealth(self.name, self.source_metrics, started_at=clock())
        self.ctx = SourceContext(
            self.name,
            config.provider_name,
            self.tracker,
            store,
            recorder,
            self.health,
            self.source_metrics,
            clock,
            auth_backoff=poll.auth_backoff,
        )
        self.refresher = Refresher(self.ctx)
        self.discovery = Discovery(self.ctx, self.refresher, config, poll.discover_interval)
        self.loaded = asyncio.Event()
        self.loop_tick = 0.0
        self._wake = asyncio.Event()
        self._reopen = False
        self._next_prune = 0.0

    def _rate(self) -> float:
        return self.config.max_requests_per_second or self.poll.max_requests_per_second

    @property
    def provider_name(self) -> str:
        return self.config.provider_name

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        await self._load()
        self.loaded.set()
        while True:
            async with self._provider():
                while not self._reopen:
                    self.loop_tick = time.monotonic()
                    await self._cycle()
                    await self._prune()
                    await self._idle()
            self._reopen = False

    @asynccontextmanager
    async def _provider(self) -> AsyncIterator[None]:
        config = self.config
        concurrency = config.max_concurrency or self.poll.max_concurrency
        provider = make_provider(
            config,
            config.api_key(self.environ),
            metrics=self.source_metrics,
            pacer=self.pacer,
            max_concurrency=concurrency,
        )
        async with provider:
            self.tracker.page_size = provider.capabilities.page_size
            tracker, clock = self.tracker, self.clock
            provider.unchanged = lambda batch_id, item: tracker.unchanged(batch_id, item, clock())
            provider.recounted = tracker.recounted
            self.ctx.provider = provider
            try:
                yield
            finally:
                self.ctx.provider = None

    async def _load(self) -> None:
        if self.config.track:
            added = await self.store.track(self.name, self.config.track, "config", self.clock())
            if added:
                log.info("tracking configured batches", source=self.name, count=len(added))
        self.tracker.load(await self.store.batches(self.name, [ACTIVE]))

    async def _cycle(self) -> None:
        now = self.clock()
        if now < self.health.auth_paused_until:
            return
        discover = self.discovery.due(now)
        due = self.tracker.due(now)
        if due:
            self.source_metrics.poll_lag.set(max(now - due[0].next_due, 0.0))
        if discover:
            await self.discovery.run()
        if due:
            await self.refresher.refresh(due)

    async def _idle(self) -> None:
        wake_at = max(self.tracker.next_due(), self.health.auth_paused_until)
        if self.config.discover:
            wake_at = min(wake_at, max(self.discovery.next_at, self.health.auth_paused_until))
        timeout = min(max(wake_at - self.clock(), 0.0), TICK, max(self._next_prune - self.clock(), 0.0))
        self._wake.clear()
        await wait_event(self._wake, timeout)

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        """Keep each batch's pace for the next start (call after the run task ended)."""
        await self.store.save_schedule(self.tracker.active())

    # -- retention ---------------------------------------------------------------------------------

    async def _prune(self) -> None:
        now = self.clock()
        if now < self._next_prune:
            return
        retention = self.poll.retention
        self._next_prune = now + min(PRUNE_EVERY, max(retention / 4, 1.0))
        for row in await self.store.prune(now - retention, self.name):
            self.tracker.forget(row.id)
            if row.raw is None or self.ctx.provider is None:
                continue
            try:
                snap = self.ctx.provider.normalize(row.raw)
            except BadResponseError:
                continue
            _, change = pruned(row.knowledge, now)
            await self.ctx.recorder.record_orphan(self.name, self.provider_name, snap, change, now)

    # -- control -----------------------------------------------------------------------------------

    def canonical(self, ids: Iterable[str]) -> list[str]:
        """The ids as this source's snapshots carry them (a Gemini `batches/abc` is `abc`)."""
        return list(dict.fromkeys(canonical_id(self.provider_name, i) for i in ids))

    async def track(self, ids: Iterable[str], origin: str) -> list[str]:
        """Start tracking ids now (reviving gone ones); returns those added."""
        added = await self.store.track(self.name, self.canonical(ids), origin, self.clock())
        for batch_id in added:
            row = await self.store.batch(self.name, batch_id)
            if row is not None:
                self.tracker.add(row)
        self.wake()
        return added

    async def untrack(self, ids: Iterable[str]) -> list[str]:
        removed = await self.store.untrack(self.name, self.canonical(ids), self.clock())
        for batch_id in removed:
            self.tracker.forget(batch_id)
        return removed

    async def reload_tracked(self) -> None:
        """Re-read the tracked set (another process tracked or untracked batches)."""
        self.tracker.load(await self.store.batches(self.name, [ACTIVE]))
        self.wake()

    async def configure(self, config: SourceConfig, poll: PollConfig) -> None:
        """Apply a reloaded config; the connection is reopened when how to reach the API changed."""
        old, self.config, self.poll = self.config, config, poll
        intervals, policy, backoff = tracker_settings(poll)
        self.tracker.intervals, self.tracker.policy, self.tracker.backoff = intervals, policy, backoff
        self.tracker.latency, self.tracker.rate = poll.latency, self._rate()
        self.tracker.period = self.tracker.walk_period()
        self.ctx.auth_backoff = poll.auth_backoff
        self.discovery.config, self.discovery.interval, self.discovery.next_at = config, poll.discover_interval, 0.0
        self.pacer.configure(self._rate())
        if config != old:
            # Perhaps a corrected key or URL: try at once instead of waiting out a pause.
            self.health.reset_auth()
            self.health.list_unavailable = False
            self.tracker.hurry(self.clock())
            self._reopen = True
        if config.track:
            await self.track(config.track, "config")
        self.wake()

    # -- what status, readiness and liveness read ----------------------------------------------------

    def alive(self, now_monotonic: float) -> bool:
        provider = self.ctx.provider
        progress = max(self.loop_tick, provider.last_progress if provider is not None else 0.0)
        pause = max(self.pacer.paused_until - now_monotonic, 0.0)
        return now_monotonic - progress < max(STALL, 2 * self.config.timeout) + pause

    def readiness(self) -> list[str]:
        recent = max(3 * self.poll.max_interval, 60.0)
        return self.health.reasons(self.clock(), recent, tracking=bool(self.tracker.active()))

    def tracked_counts(self) -> dict[str, int]:
        """Active batches by status, from memory ("not yet polled" before the first answer)."""
        counts = Counter(b.knowledge.status or "not yet polled" for b in self.tracker.active())
        return dict(sorted(counts.items()))

    def stalled_count(self) -> int:
        """Active batches stalled now (in progress, counts unmoved since their `batch.stalled`), from memory."""
        return sum(1 for b in self.tracker.active() if stalled(b.knowledge))

    def view(self) -> dict[str, object]:
        provider = self.ctx.provider
        health = self.health
        return {
            "provider": self.provider_name,
            "health": "ok" if health.up else ("auth_failing" if health.auth_failing else "failing"),
            "misconfigured": health.misconfigured,
            "last_success": health.last_success,
            "api_failing_since": health.api_failing_since,
            "tracked": self.tracked_counts(),
            "requests": dict(provider.requests) if provider is not None else {},
            "next_poll_at": _finite(self.tracker.next_due()),
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
