"""Discovery: adopting a source's batches nobody tracked by hand, so none is missed.

Each pass walks the list newest first back to a horizon: the newest creation time the previous pass
saw, less an overlap for clock skew and for batches that appear late in the list. Every batch created
since, final ones included, is adopted (unless a user untracked it or the filters exclude it), so a
batch that was created and failed between two passes still gets its events. The horizon is stored,
so a restart misses nothing in between.

The very first pass (no stored horizon) looks back `FIRST_PASS_AGE` and adopts only batches still
running: reporting days of finished history on first start would flood consumers. Later passes keep
to that choice: a final batch created no later than the newest one the first pass left alone (the
stored `FLOOR`) was history then and is never adopted, though the overlap makes later passes see it.
"""

from __future__ import annotations

import math

import structlog

from poller.config.sources import SourceBase
from poller.domain.lifecycle import is_final
from poller.domain.snapshot import Snapshot
from poller.errors import ApiError
from poller.polling.refresh import Refresher, SourceContext

log = structlog.get_logger("poller.discovery")

#: How far back the first pass looks for batches that are still running.
FIRST_PASS_AGE = 3 * 86400
#: Later passes stop this far behind the newest batch the previous pass saw.
OVERLAP = 600
CURSOR = "discover.horizon"
#: The creation time of the newest final batch the first pass left alone.
FLOOR = "discover.floor"


class Discovery:
    def __init__(self, ctx: SourceContext, refresher: Refresher, config: SourceBase, interval: float) -> None:
        self.ctx = ctx
        self.refresher = refresher
        self.config = config
        self.interval = interval
        self.next_at = 0.0

    def due(self, now: float) -> bool:
        return self.config.discover and self.ctx.api.capabilities.can_list and now >= self.next_at

    async def run(self) -> None:
        """One pass; a failed request ends it early (the next pass starts from the same horizon)."""
        ctx = self.ctx
        now = ctx.clock()
        self.next_at = now + self.interval
        stored = await ctx.store.cursor(ctx.name, CURSOR)
        first = stored is None
        horizon = int(now) - FIRST_PASS_AGE if stored is None else int(stored)
        floor_text = None if first else await ctx.store.cursor(ctx.name, FLOOR)
        floor = math.inf if first else -math.inf if floor_text is None else int(floor_text)
        declined: int | None = None
        cursor: str | None = None
        newest: int | None = None
        while True:
            try:
                page = await ctx.api.list_page(cursor)
            except ApiError as exc:
                await self.refresher.failed(exc, [])
                return
            ctx.health.ok(ctx.clock())
            self.refresher.report_rejected(page)
            if page.newest_created_at is not None:
                newest = max(newest or page.newest_created_at, page.newest_created_at)
            since = [s for s in page.snapshots if s.created_at >= horizon]
            history = [s.created_at for s in since if is_final(s.status) and s.created_at <= floor]
            if first and history:
                declined = max(history) if declined is None else max(declined, *history)
            await self._adopt([s for s in since if not (is_final(s.status) and s.created_at <= floor)])
            await self.refresher.apply_page(page)
            oldest = page.oldest_created_at
            older_from_here = ctx.api.capabilities.newest_first and oldest is not None and oldest < horizon
            if page.next is None or older_from_here:
                break
            cursor = page.next
        # The provider's clock, not ours: the newest batch seen stands for when this pass began.
        later = horizon if newest is None else max(horizon, newest - OVERLAP)
        if declined is not None:  # before the horizon: a pass stored without its floor would adopt history
            await ctx.store.set_cursor(ctx.name, FLOOR, str(declined))
        await ctx.store.set_cursor(ctx.name, CURSOR, str(later))

    async def _adopt(self, snapshots: list[Snapshot]) -> None:
        """Start tracking new batches that match the discovery filters (never one a user untracked)."""
        ctx = self.ctx
        fresh = [
            s
            for s in snapshots
            if s.id not in ctx.tracker.batches and self.config.wants(dict(s.metadata or {}), s.endpoint)
        ]
        if not fresh:
            return
        left_alone = await ctx.store.untracked(ctx.name, [s.id for s in fresh])
        wanted = [s.id for s in fresh if s.id not in left_alone]
        if not wanted:
            return
        added = await ctx.store.track(ctx.name, wanted, "discover", ctx.clock())
        for batch_id in added:
            # The stored row, not a blank one: a batch tracked before resumes its recorded sequence.
            row = await ctx.store.batch(ctx.name, batch_id)
            if row is not None:
                ctx.tracker.add(row)
        if added:
            log.info("discovered batches", source=ctx.name, count=len(added))
