"""Fetching batches and applying what comes back: retrieves, list walks (bulk refresh and discovery),
and the API's health as the logs and readiness see it.

Every fetched batch goes through `Tracker.observe`; the resulting batch rows and events are written with
their outbox rows in one transaction per answer, and `on_enqueued` then wakes the delivery workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from poller.api import BatchApi, Page
from poller.config import Config
from poller.errors import ApiError, BadResponseError
from poller.metrics import Metrics
from poller.models import Batch
from poller.records import TrackedBatch
from poller.store import Store
from poller.tracker import Observation, Tracker, Update
from poller.transitions import is_final

log = structlog.get_logger("poller.refresh")

#: On the first discovery walk, how far back to look for batches that are still running.
DISCOVER_MAX_AGE = 3 * 86400
#: Later walks stop this far behind the newest batch the previous walk saw (same-second creations, skew).
DISCOVER_OVERLAP = 600


@dataclass(slots=True)
class Health:
    """What /readyz, STATUS= and `status` report."""

    store_open: bool = False
    last_success: float | None = None
    api_failing_since: float | None = None
    auth_failing: bool = False
    auth_paused_until: float = 0.0
    auth_failures: int = 0
    loop_tick: float = 0.0


class Refresher:
    """Polls through one `BatchApi` (swapped by the daemon on reload) on behalf of one `Tracker`."""

    def __init__(
        self,
        config: Config,
        tracker: Tracker,
        store: Store,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        on_enqueued: Callable[[], None],
        health: Health,
    ) -> None:
        self.config = config
        self.tracker = tracker
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.on_enqueued = on_enqueued
        self.source = tracker.source
        self.api: BatchApi | None = None
        self.health = health
        self.next_discover = 0.0
        self._discover_horizon: int | None = None
        #: Set when the list endpoint answered 404/405: bulk refresh and discovery are then impossible.
        self.list_unavailable = False

    async def refresh(self, due: list[TrackedBatch]) -> None:
        """Refresh every due batch, through list pages when that costs fewer requests.

        While a 429's Retry-After pause runs, nothing is sent: the due batches move to its end.
        """
        api = self.api
        assert api is not None, "the daemon opens the API client before polling"
        pause = api.pacer.paused_until - time.monotonic()
        if pause > 0:
            for batch in due:
                self.tracker.defer(batch.id, self.clock() + pause)
            return
        remaining = {b.id for b in due}
        plan = None if self.list_unavailable else self.tracker.plan_walk(due)
        if plan is not None:
            stop_before, max_pages = plan
            remaining = await self._walk(targets=remaining, stop_before=stop_before, max_pages=max_pages)
        if remaining:
            await asyncio.gather(*(self._retrieve(batch_id) for batch_id in remaining))

    async def _retrieve(self, batch_id: str) -> None:
        api = self.api
        assert api is not None, "the daemon opens the API client before polling"
        try:
            batch = await api.retrieve(batch_id)
        except ApiError as exc:
            self._api_failed(exc, [batch_id])
            return
        self._api_ok()
        if batch.id != batch_id:
            self.metrics.bad_responses.labels("wrong_id").inc()
            log.warning("retrieve answered with another batch; ignored", batch_id=batch_id, answered=batch.id)
            self._api_failed(BadResponseError("retrieve answered with another batch"), [batch_id])
            return
        self._apply([batch])

    async def _walk(self, *, targets: set[str], stop_before: int | None, max_pages: int) -> set[str]:
        """Walk list pages newest first, applying every tracked batch seen; returns the targets not seen.

        Stops when every target was seen, the pages passed `stop_before` (a created_at), the pages ran
        out, or `max_pages` were read, unless pages keep paying for themselves (the last page found two or
        more targets, so reading the next one likely costs fewer requests than retrieving them).
        """
        api = self.api
        assert api is not None, "the daemon opens the API client before polling"
        after: str | None = None
        marks: list[int] = []
        items = tracked_seen = pages = 0
        ceiling = len(targets)  # never more pages than one retrieve per target would cost
        while True:
            try:
                page = await api.list_page(after)
            except ApiError as exc:
                if exc.status in {404, 405} and after is None:
                    # Some compatible APIs and proxies have no list endpoint: retrieve one by one from now on.
                    self.list_unavailable = True
                    log.warning("the API has no batch list endpoint; refreshing with one retrieve per batch")
                    return targets
                self._api_failed(exc, sorted(targets))
                return set()
            self._api_ok()
            pages += 1
            items += len(page.batches) + page.rejected
            tracked_seen += sum(1 for b in page.batches if b.id in self.tracker.batches)
            seen = {b.id for b in page.batches} & targets
            targets -= seen
            self._apply(page.batches)
            if page.batches:
                marks.append(page.batches[-1].created_at)
            paying = len(seen) >= 2  # this page found enough to justify reading the next one
            budget_left = pages < max_pages or (paying and pages < ceiling)
            if not page.has_more or not page.last_id or _passed(page, stop_before) or not targets or not budget_left:
                break
            after = page.last_id
        self.tracker.learn_walk(marks, items, tracked_seen)
        return targets

    async def discover(self) -> None:
        now = self.clock()
        horizon = self._discover_horizon if self._discover_horizon is not None else int(now) - DISCOVER_MAX_AGE
        self.next_discover = now + self.config.poll.discover_interval
        newest = await self._discover_walk(horizon)
        if newest is not None:
            self._discover_horizon = newest - DISCOVER_OVERLAP

    async def _discover_walk(self, horizon: int) -> int | None:
        api = self.api
        assert api is not None, "the daemon opens the API client before polling"
        after: str | None = None
        newest: int | None = None
        while True:
            try:
                page = await api.list_page(after)
            except ApiError as exc:
                self._api_failed(exc, [])
                return None
            self._api_ok()
            if page.batches:
                newest = max(newest or 0, page.batches[0].created_at)
            self._adopt(b for b in page.batches if b.created_at >= horizon)
            self._apply(page.batches)
            if not page.has_more or not page.last_id or _passed(page, horizon):
                return newest
            after = page.last_id

    def _adopt(self, batches: Iterable[Batch]) -> None:
        """Start tracking discovered batches that are still running and match the discovery filters."""
        src = self.config.source
        fresh = [
            b
            for b in batches
            if b.id not in self.tracker.batches
            and not is_final(b.status)
            and all((b.metadata or {}).get(k) == v for k, v in src.discover_metadata.items())
            and (not src.discover_endpoints or b.endpoint in src.discover_endpoints)
        ]
        if fresh:
            left_alone = self.store.untracked(self.source, [b.id for b in fresh])
            fresh = [b for b in fresh if b.id not in left_alone]
        if not fresh:
            return
        now = self.clock()
        added = self.store.track(self.source, [b.id for b in fresh], "discover", now)
        for batch_id in added:
            # The stored row, not a blank one: a batch tracked before resumes its recorded sequence.
            row = self.store.batch(self.source, batch_id)
            self.tracker.batches[batch_id] = row or TrackedBatch(self.source, batch_id, "discover", now)
        if added:
            log.info("discovered batches", count=len(added))

    def _apply(self, batches: Iterable[Batch]) -> None:
        """Detect transitions in fetched batches and write them with their outbox rows in one transaction."""
        now = self.clock()
        updates: list[Update] = []
        for batch in batches:
            observation = self.tracker.observe(batch, now)
            if observation is None:
                continue
            self._report(batch, observation)
            if observation.update is not None:
                updates.append(observation.update)
        self._save(updates)

    def _save(self, updates: list[Update]) -> None:
        if updates and self.store.save(updates, self.clock()):
            self.on_enqueued()

    def _report(self, batch: Batch, observation: Observation) -> None:
        self.metrics.polls.labels("ok" if observation.warning is None else "ignored").inc()
        if observation.warning is not None:
            reason = "unknown_status" if "unknown status" in observation.warning else "backwards_status"
            self.metrics.bad_responses.labels(reason).inc()
            log.warning(observation.warning, batch_id=batch.id, status=batch.status)
        for event in observation.events:
            self.metrics.transitions.labels(event.type).inc()
            log.info(
                event.type,
                batch_id=batch.id,
                status=event.data.status,
                previous_status=event.data.previous_status,
                event_id=event.id,
                sequence=event.data.sequence,
            )

    # -- health transitions ------------------------------------------------------------------------

    def _api_ok(self) -> None:
        now = self.clock()
        self.health.last_success = now
        if self.health.auth_failing:
            self.health.auth_failing = False
            self.health.auth_failures = 0
            log.info("the Batch API accepts the credentials again; polling resumed")
        if self.health.api_failing_since is not None:
            log.info("Batch API recovered", outage_seconds=round(now - self.health.api_failing_since, 1))
            self.health.api_failing_since = None

    def _api_failed(self, exc: ApiError, batch_ids: list[str]) -> None:
        now = self.clock()
        self.metrics.polls.labels(exc.kind).inc()
        if exc.kind == "auth":
            self._auth_failed(exc, now)
            return
        updates = [u for b in batch_ids if (u := self.tracker.failed(b, exc, now)) is not None]
        for tracked, _ in updates:
            log.warning("batch not found repeatedly; marked gone", batch_id=tracked.id, attempts=tracked.not_found)
        self._save(updates)
        if exc.kind == "not_found":
            return
        if exc.kind in {"transport", "server"} and self.health.api_failing_since is None:
            self.health.api_failing_since = now
            log.warning(
                "Batch API unreachable; backing off", error=str(exc), status=exc.status, request_id=exc.request_id
            )
        else:
            log.info(
                "Batch API request failed",
                error=str(exc),
                status=exc.status,
                request_id=exc.request_id,
                batch_id=batch_ids[0] if len(batch_ids) == 1 else None,
            )

    def _auth_failed(self, exc: ApiError, now: float) -> None:
        health = self.health
        if now >= health.auth_paused_until:  # the first rejection after a pause ended: the pause doubles
            health.auth_failures += 1
        pause = min(self.config.poll.auth_backoff * 2 ** (health.auth_failures - 1), 3600.0)
        health.auth_paused_until = max(health.auth_paused_until, now + pause)
        for batch in self.tracker.active():
            self.tracker.defer(batch.id, health.auth_paused_until)
        if not health.auth_failing:
            health.auth_failing = True
            log.error(
                "THE BATCH API REJECTS THE CREDENTIALS: polling is paused; check source.api_key_env / api_key_file",
                status=exc.status,
                request_id=exc.request_id,
                retry_in=round(pause),
            )


def _passed(page: Page, created_at: int | None) -> bool:
    return created_at is not None and bool(page.batches) and page.batches[-1].created_at < created_at
