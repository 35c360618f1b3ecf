"""Replicas on one shared store: take, renew and give up a lease per source, so that one replica at a
time polls each source, and start or stop that source's poll loop as its lease comes and goes.

One round (every third of the TTL, sooner when another replica's lease is about to run out or one
released its leases): read the lease table, plan with `poller.domain.balance.plan`, stop polling and
release what is over this replica's share, take or renew the rest in one call. A lease not renewed is
another replica's after one TTL, so a replica that cannot renew (the database is unreachable) stops
polling before its leases run out rather than risk two replicas polling one source.

Lease expiry is wall-clock time (`clock`, the daemon's): replicas on different hosts need clocks in
sync (NTP) to well within the TTL.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

import structlog

from poller.aio import wait_event
from poller.domain.balance import MEMBER_PREFIX, LeasePlan, member_key, plan
from poller.metrics import Metrics
from poller.store.base import Leases

log = structlog.get_logger("poller.leasing")

#: Rounds come at most this often, however many wake-ups arrive (seconds).
MIN_ROUND_GAP = 1.0
#: After another replica's lease runs out, look this much later (its rows are then surely expired).
EXPIRY_SLACK = 0.25
#: Without a successful renewal, stop polling this long before the leases run out.
SAFETY = 0.1


class LeaseKeeper:
    """Holds this replica's leases; `start` and `stop` turn a source's polling on and off."""

    def __init__(
        self,
        store: Leases,
        name: str,
        ttl: float,
        *,
        sources: Callable[[], list[str]],
        start: Callable[[str], Awaitable[None]],
        stop: Callable[[str, bool], Awaitable[None]],
        clock: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.name = name
        self.ttl = ttl
        self._sources = sources
        self._start = start
        self._stop = stop
        self.clock = clock
        self.metrics = metrics
        #: Sources this replica polls now.
        self.held: set[str] = set()
        #: Until when the leases taken in the last successful round last.
        self.valid_until = -math.inf
        #: The lease table as last read: source -> (holder, expires_at).
        self.table: dict[str, tuple[str, float]] = {}
        self._wake = asyncio.Event()
        self._failing = False
        metrics.replica_info.labels(name).set(1)

    def wake(self) -> None:
        """Another process changed the store (perhaps released leases): look again soon."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.round()
            deadline = self._next_round()
            await asyncio.sleep(MIN_ROUND_GAP)
            remaining = deadline - self.clock()
            if remaining > 0 and not self._wake.is_set():
                await wait_event(self._wake, remaining)

    def _next_round(self) -> float:
        now = self.clock()
        at = now + self.ttl / 3
        for holder, until in self.table.values():
            if holder != self.name and until > now:
                at = min(at, until + EXPIRY_SLACK)  # a lease about to run out: perhaps its replica died
        return min(at, self.valid_until - SAFETY * self.ttl)

    async def round(self) -> None:
        """One planning round; never raises: a store error, or a store too slow to answer before the held
        leases run out, is logged, counted and retried next round."""
        now = self.clock()
        sources = self._sources()
        budget = self.valid_until - SAFETY * self.ttl - now if self.held else self.ttl
        try:
            async with asyncio.timeout(max(budget, 0.0)):  # never poll on past the leases' end
                step, got = await self._exchange(sources, now)
        except Exception as exc:  # the store is unreachable or stuck: hold on until the leases run out
            await self._failed(exc)
            return
        try:
            self._renewed(step, now)
            await self._apply(step, got)
        except Exception:  # a store blip while releasing: the next round puts it right
            self.metrics.lease_failures.inc()
            log.exception("a lease round failed; retrying next round", replica=self.name)

    def _renewed(self, step: LeasePlan, now: float) -> None:
        if self._failing:
            self._failing = False
            log.info("leases renewed again", replica=self.name)
        self.valid_until = now + self.ttl
        self.metrics.replicas.set(step.replicas)

    async def _apply(self, step: LeasePlan, got: set[str]) -> None:
        """Start and stop polling as the leases now held say."""
        member = member_key(self.name)
        polled = got - {member}
        for source in sorted(self.held - polled):
            # Taken over: this replica was too slow to renew. The new holder owns the schedule now.
            await self._stop_polling(source, "lease lost", save=False)
        current = set(self._sources())  # a reload may have removed a source while this round ran
        for source in sorted((polled & current) - self.held):
            log.info("polling source", source=source, replica=self.name, replicas=step.replicas)
            await self._start(source)
            self.held.add(source)
            self.metrics.source_polled.labels(source).set(1)
        stale = {s for s in polled if s not in current}
        stale |= {s for s, (holder, _) in self.table.items() if holder == self.name and s not in got}
        if stale:  # a source a reload removed, or one this replica held before a restart under its name
            await self.store.release_leases(self.name, sorted(stale))

    async def _exchange(self, sources: list[str], now: float) -> tuple[LeasePlan, set[str]]:
        """Read the table, give up what is over this replica's share, take or renew the rest."""
        self.table = await self.store.leases()
        step = plan(self.name, sources, self.table, now)
        for source in step.release:  # stop polling before another replica may start
            await self._stop_polling(source, "rebalanced")
        if step.release:
            await self.store.release_leases(self.name, list(step.release))
        return step, set(await self.store.acquire_leases(self.name, list(step.acquire), now, self.ttl))

    async def _failed(self, exc: Exception) -> None:
        self.metrics.lease_failures.inc()
        if not self._failing:
            self._failing = True
            log.warning("cannot renew leases", replica=self.name, error=str(exc) or type(exc).__name__)
        if self.clock() >= self.valid_until - SAFETY * self.ttl:
            for source in sorted(self.held):
                await self._stop_polling(source, "lease not renewed", save=False)

    async def _stop_polling(self, source: str, reason: str, *, save: bool = True) -> None:
        """Stop polling `source`; `save` keeps its batches' pace for the next holder (only while the lease
        is still this replica's)."""
        if source not in self.held:
            return
        log.info("stopped polling source", source=source, replica=self.name, reason=reason)
        self.held.discard(source)
        self.metrics.source_polled.labels(source).set(0)
        await self._stop(source, save)

    async def forget(self, source: str) -> None:
        """`source` left the config: stop polling it and free its lease at once."""
        await self._stop_polling(source, "removed from the config")
        await self.store.release_leases(self.name, [source])

    async def close(self) -> None:
        """Stop polling and release every lease at once, so the other replicas take over without waiting."""
        for source in sorted(self.held):
            await self._stop_polling(source, "shutting down")
        try:
            await self.store.release_leases(self.name)
        except Exception as exc:  # the leases then run out on their own, one TTL from the last renewal
            log.warning("cannot release leases", replica=self.name, error=str(exc) or type(exc).__name__)
        else:
            log.info("released leases", replica=self.name)

    def view(self) -> dict[str, object]:
        """What `/v1/status` shows of the replicas."""
        now = self.clock()
        leases = {
            source: {"holder": holder, "expires_in": round(until - now, 3)}
            for source, (holder, until) in sorted(self.table.items())
            if not source.startswith(MEMBER_PREFIX) and until > now
        }
        replicas = sorted(h for key, (h, until) in self.table.items() if key.startswith(MEMBER_PREFIX) and until > now)
        return {
            "name": self.name,
            "lease_ttl": self.ttl,
            "polling": sorted(self.held),
            "replicas": replicas or [self.name],
            "leases": leases,
        }
