"""Refreshing one source's due batches: list walks where they cost fewer requests, retrieves for the
rest, and what a failed request means (a backoff, a pause for rejected credentials, a batch gone, or an
API that is misconfigured).

A 404 counts toward a batch being gone only when it is the API's own JSON answer while the API
otherwise answers properly. An HTML 404, a 2xx that is not JSON, or 404s for everything while nothing
else works, say `base_url` is wrong: the source reports that and keeps its batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from poller.domain.snapshot import Snapshot
from poller.errors import ApiError, BadResponseError
from poller.metrics import SourceMetrics
from poller.polling.health import SourceHealth
from poller.polling.recorder import Recorder
from poller.polling.tracker import Observation, Tracker
from poller.providers.base import Page, Provider
from poller.store.base import BatchStore, TrackedBatch

log = structlog.get_logger("poller.refresh")


@dataclass(slots=True)
class SourceContext:
    """What the refresher and discovery of one source share."""

    name: str
    provider_name: str
    tracker: Tracker
    store: BatchStore
    recorder: Recorder
    health: SourceHealth
    metrics: SourceMetrics
    clock: Callable[[], float]
    auth_backoff: float = 60.0
    provider: Provider | None = None

    @property
    def api(self) -> Provider:
        assert self.provider is not None, "the runner opens the provider before polling"
        return self.provider


@dataclass(slots=True)
class _Outcomes:
    """What one refresh learned about the API as a whole."""

    ok: int = 0
    #: Answers that were not the API's own (HTML pages, non-JSON bodies): base_url is likely wrong.
    foreign: bool = False
    #: Batches whose retrieve got such a 404: backed off in `_settle`, never counted toward gone.
    foreign_404: list[str] = field(default_factory=list)
    not_found: list[tuple[str, ApiError]] = field(default_factory=list)


class Refresher:
    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx

    async def refresh(self, due: list[TrackedBatch]) -> None:
        """Refresh every due batch, through list pages when that costs fewer requests.

        While a 429's Retry-After pause runs, nothing is sent: the due batches move to its end.
        """
        ctx = self.ctx
        pause = ctx.api.paused_until - time.monotonic()
        if pause > 0:
            ctx.tracker.defer_all(ctx.clock() + pause)
            return
        outcomes = _Outcomes()
        listable = ctx.api.capabilities.can_list and not ctx.health.list_unavailable
        ctx.tracker.listable = listable
        plan = None
        if listable:
            now = ctx.clock()
            due = ctx.tracker.pull_in(due, now)
            plan = ctx.tracker.plan_walk(due)
            if plan is not None:
                ctx.tracker.begin_walk(now)
        remaining = {b.id for b in due}
        if plan is not None:
            remaining = await self._walk(remaining, plan[0], plan[1], outcomes)
        if remaining:
            await asyncio.gather(*(self._retrieve(batch_id, outcomes) for batch_id in sorted(remaining)))
        await self._settle(outcomes)

    # -- fetching ----------------------------------------------------------------------------------

    async def _retrieve(self, batch_id: str, outcomes: _Outcomes) -> None:
        try:
            snap = await self.ctx.api.retrieve(batch_id)
        except ApiError as exc:
            await self.failed(exc, [batch_id], outcomes)
            return
        outcomes.ok += 1
        self.ctx.health.ok(self.ctx.clock())
        await self.apply([snap], listed=False)

    async def _walk(self, targets: set[str], stop_before: int | None, max_pages: int, outcomes: _Outcomes) -> set[str]:
        """Walk list pages newest first, applying every tracked batch seen; returns the targets not seen.

        Stops when every target was seen, the pages passed `stop_before` (a created_at), the pages ran
        out, or `max_pages` were read, unless pages keep paying for themselves (the last page found two or
        more targets, so reading the next one likely costs fewer requests than retrieving them).
        """
        ctx = self.ctx
        cursor: str | None = None
        marks: list[int] = []
        items = tracked_seen = pages = 0
        ceiling = len(targets)  # never more pages than one retrieve per target would cost
        newest_first = ctx.api.capabilities.newest_first  # else no page says the rest is older
        # Page k is requested no sooner than k spacings after the first (`Tracker.page_spacing`): a walk
        # lasts about as long as the heaviest recent one, so each page's period stays the walk period.
        spacing = ctx.tracker.page_spacing()
        started = time.monotonic()
        idle = 0.0  # seconds the walk only waited on its own spacing
        # The next page is requested before this one is applied: its answer travels while detection
        # and the state write run (each batch is on one page only, so the order changes nothing).
        ahead: asyncio.Task[tuple[Page, float]] | None = None
        try:
            while True:
                pending, ahead = ahead, None
                waiting = time.monotonic()
                try:
                    page, held = await (pending if pending is not None else self._page_at(cursor, started))
                except ApiError as exc:
                    return await self._list_failed(exc, first=cursor is None, targets=targets, outcomes=outcomes)
                # Unpaced, the request would have left `held` seconds sooner: that much of the wait for
                # it, at most, was the spacing's and not the walk's own work.
                idle += min(time.monotonic() - waiting, held)
                outcomes.ok += 1
                ctx.health.ok(ctx.clock())
                pages += 1
                self.report_rejected(page)
                items += len(page.snapshots) + len(page.rejected) + len(page.unchanged)
                tracked_seen += sum(1 for s in page.snapshots if s.id in ctx.tracker.batches) + len(page.unchanged)
                seen = ({s.id for s in page.snapshots} | {i for i, _ in page.unchanged}) & targets
                targets -= seen
                oldest = page.oldest_created_at
                if oldest is not None:
                    marks.append(oldest)
                paying = len(seen) >= 2  # this page found enough to justify reading the next one
                budget_left = pages < max_pages or (paying and pages < ceiling)
                passed = newest_first and stop_before is not None and oldest is not None and oldest < stop_before
                last = page.next is None or passed or not targets or not budget_left
                if not last:
                    cursor = page.next
                    ahead = asyncio.create_task(self._page_at(cursor, started + pages * spacing))
                await self.apply_page(page)
                if last:
                    break
        finally:
            if ahead is not None:  # the walk was cancelled or failed while the next page was on its way
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # its own failure is moot now
                    await ahead
        ctx.tracker.learn_walk(marks, items, tracked_seen, (time.monotonic() - started - idle) / max(pages, 1))
        return targets

    async def _list_failed(self, exc: ApiError, *, first: bool, targets: set[str], outcomes: _Outcomes) -> set[str]:
        """What a failed list page means for the walk; returns the targets left to retrieve."""
        ctx = self.ctx
        if first and exc.status in {404, 405} and exc.from_api:
            # Some compatible APIs and proxies have no list endpoint: retrieve one by one from now on.
            ctx.health.list_unavailable = True
            log.warning("the API has no batch list endpoint; refreshing with one retrieve per batch", source=ctx.name)
            return targets
        if exc.status == 404 or isinstance(exc, BadResponseError):
            # Not JSON, or a 404 that is not the API's own: a wrong base_url. A page that is JSON but no
            # list (too deep, bad items) is a bad answer: counted, and retrieves go on.
            outcomes.foreign = outcomes.foreign or _foreign(exc)
            if isinstance(exc, BadResponseError):
                ctx.health.warn_once("list", "a list page is not one we can trust", problem=str(exc))
            return targets  # the retrieves tell whether the API works at all
        await self.failed(exc, sorted(targets), outcomes)
        return set()

    async def _page_at(self, cursor: str | None, at: float) -> tuple[Page, float]:
        """The list page after `cursor`, requested no sooner than `at` (monotonic); and how long it was held."""
        held = max(at - time.monotonic(), 0.0)
        if held:
            await asyncio.sleep(held)
        return await self.ctx.api.list_page(cursor), held

    # -- applying what came back -------------------------------------------------------------------

    async def apply_page(self, page: Page) -> None:
        """Apply a list page: its snapshots, and the items it vouched unchanged (only their schedule moves)."""
        if page.unchanged:
            ctx = self.ctx
            now = ctx.clock()
            for batch_id, _ in page.unchanged:
                ctx.tracker.seen_unchanged(batch_id, now)
            ctx.metrics.poll("ok", len(page.unchanged))
        await self.apply(page.snapshots)

    async def apply(self, snapshots: Iterable[Snapshot], *, listed: bool = True) -> None:
        """Detect transitions in fetched snapshots and record them, in one transaction per call.

        `listed`: the snapshots come from a list page (the next walk refreshes them).
        """
        ctx = self.ctx
        now = ctx.clock()
        observations: list[Observation] = []
        ok = 0
        tracked = ctx.tracker.batches
        for snap in snapshots:
            if snap.id not in tracked:
                continue  # an untracked batch on the page: not worth serializing its body
            try:
                body, body_print = ctx.tracker.body(snap)
                obs = ctx.tracker.observe(snap, body, now, listed=listed, body_print=body_print)
            except Exception:  # one batch must never stop the others: count it, log it, go on
                ctx.metrics.bad_response("unprocessable")
                log.exception("a batch could not be processed; skipped", source=ctx.name, batch_id=snap.id)
                continue
            if obs is None:
                continue
            if obs.warning is None:
                ok += 1
                if obs.row is None:
                    continue  # nothing to record
            else:
                ctx.metrics.poll("ignored")
                reason = "unknown_status" if obs.warning.startswith("unknown status") else "backwards_status"
                ctx.metrics.bad_response(reason)
                ctx.health.warn_once(snap.id, obs.warning, batch_id=snap.id, status=snap.provider_status)
            observations.append(obs)
        if ok:
            ctx.metrics.poll("ok", ok)  # one label lookup per call, not one per batch
        recorded = await ctx.recorder.record(ctx.name, ctx.provider_name, observations, now)
        for _, batch_id in recorded.conflicts:
            # Another writer recorded this batch first (a replica overlapping briefly): take its row.
            row = await ctx.store.batch(ctx.name, batch_id)
            if row is None:
                ctx.tracker.forget(batch_id)
            else:
                ctx.tracker.add(row)

    def report_rejected(self, page: Page) -> None:
        for batch_id, problem in page.rejected:
            key = batch_id or "(no id)"
            self.ctx.health.warn_once(
                key, "list item is not a batch we can trust; skipped", batch_id=batch_id, problem=problem
            )

    # -- failures ----------------------------------------------------------------------------------

    async def failed(self, exc: ApiError, batch_ids: list[str], outcomes: _Outcomes | None = None) -> None:
        """Apply a failed request for `batch_ids`; 404s wait for `_settle`, which knows the whole cycle."""
        ctx, now = self.ctx, self.ctx.clock()
        ctx.metrics.poll(exc.kind, max(len(batch_ids), 1))
        if exc.kind == "auth":
            until = ctx.health.auth_failed(exc, now, ctx.auth_backoff)
            ctx.tracker.defer_all(until)
            return
        if outcomes is not None and exc.status == 404:
            if exc.from_api:
                outcomes.not_found += [(b, exc) for b in batch_ids]
            else:
                outcomes.foreign = True
                outcomes.foreign_404 += batch_ids
        elif outcomes is not None and _foreign(exc):
            outcomes.foreign = True
        for batch_id in batch_ids:
            if exc.status != 404:
                ctx.tracker.failed(batch_id, exc, now, counts_as_gone=False)
        if isinstance(exc, BadResponseError):
            for batch_id in batch_ids:
                ctx.health.warn_once(
                    batch_id, "the API's answer is not a batch we can trust", batch_id=batch_id, problem=str(exc)
                )
        elif exc.status != 404:
            ctx.health.failed(exc, now, batch_ids[0] if len(batch_ids) == 1 else None)

    async def _settle(self, outcomes: _Outcomes) -> None:
        """Decide what this refresh's 404s mean, now that the whole refresh is known."""
        ctx, now = self.ctx, self.ctx.clock()
        if outcomes.foreign:
            ctx.health.set_misconfigured("it answers with pages that are not the Batch API's (HTML or not JSON)")
        elif outcomes.not_found and outcomes.ok == 0 and ctx.api.capabilities.can_list:
            outcomes.ok += await self._probe()
        if outcomes.not_found and outcomes.ok == 0 and not outcomes.foreign:
            ctx.health.set_misconfigured("every batch polled answers 404 and nothing else answers")
        elif outcomes.ok and not outcomes.foreign:
            ctx.health.set_misconfigured(None)
        counts = outcomes.ok > 0 and not outcomes.foreign
        gone = []
        for batch_id, exc in outcomes.not_found:
            row = ctx.tracker.failed(batch_id, exc, now, counts_as_gone=counts)
            if row is not None:
                log.warning(
                    "batch not found repeatedly; marked gone",
                    source=ctx.name,
                    batch_id=batch_id,
                    attempts=row.not_found,
                )
                gone.append(row)
        foreign = ApiError("not the API's answer", status=404)
        for batch_id in outcomes.foreign_404:
            ctx.tracker.failed(batch_id, foreign, now, counts_as_gone=False)
        if gone:
            await ctx.recorder.record(ctx.name, ctx.provider_name, [], now, rows=gone)

    async def _probe(self) -> int:
        """One list request: does the API answer at all? 1 if it does."""
        try:
            page = await self.ctx.api.list_page(None)
        except ApiError:
            return 0
        self.ctx.health.ok(self.ctx.clock())
        await self.apply_page(page)
        return 1


def _foreign(exc: ApiError) -> bool:
    """Whether an answer came from something other than the API (a wrong base_url, a proxy's page)."""
    if isinstance(exc, BadResponseError):
        return exc.reason == "not_json"
    return exc.status == 404 and not exc.from_api
