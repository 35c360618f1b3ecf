"""The daemon as the HTTP service sees it (`poller.service.app.ServiceBackend`): status, batches, and
tracking by id, each naming its source where more than one is configured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from poller.metrics import Metrics
from poller.runtime.daemon import Daemon
from poller.runtime.views import batch_view
from poller.store.base import EventLog


class DaemonControl:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def metrics(self) -> Metrics:
        return self.daemon.metrics

    @property
    def source_names(self) -> list[str]:
        return list(self.daemon.runners)

    @property
    def event_log(self) -> EventLog:
        return self.daemon.store

    def watch_recordings(self, listener: Callable[[int | None], None]) -> Callable[[], None]:
        """Call `listener` after each recording (with the log position) until the returned function is called."""
        listeners = self.daemon.recording_listeners
        listeners.append(listener)
        return lambda: listeners.remove(listener)

    def liveness(self) -> tuple[bool, dict[str, object]]:
        return self.daemon.liveness()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        return self.daemon.readiness()

    def tracked_counts(self) -> dict[str, dict[str, int]]:
        return self.daemon.tracked_counts()

    def stalled_counts(self) -> dict[str, int]:
        return self.daemon.stalled_counts()

    async def sink_views(self) -> dict[str, dict[str, object]]:
        d = self.daemon
        return d.sinks.views(await d.store.outbox_stats(), d.clock())

    async def status(self) -> dict[str, Any]:
        d = self.daemon
        ready, detail = d.readiness()
        return {
            "status_line": d.status_line(),
            "ready": ready,
            "reasons": detail.get("reasons", []),
            "sources": self._source_views(),
            "sinks": await self.sink_views(),
            "tracked": self._flat_counts(),
            "replica": self._replica(),
        }

    def _source_views(self) -> dict[str, dict[str, object]]:
        d = self.daemon
        polling = set(d.polling())
        leases = d.leasing.view()["leases"] if d.leasing is not None else {}
        assert isinstance(leases, dict)
        views: dict[str, dict[str, object]] = {}
        for name, runner in d.runners.items():
            view: dict[str, object] = runner.view() if name in polling else {"provider": runner.provider_name}
            held = leases.get(name)
            view["polled_by"] = d.replica_name if name in polling else (held["holder"] if held else None)
            views[name] = view
        return views

    def _replica(self) -> dict[str, object]:
        d = self.daemon
        if d.leasing is not None:
            return d.leasing.view()
        return {"name": d.replica_name, "polling": d.polling(), "replicas": [d.replica_name], "leases": {}}

    def _flat_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for counts in self.daemon.tracked_counts().values():
            for status, n in counts.items():
                total[status] = total.get(status, 0) + n
        return dict(sorted(total.items()))

    def _names(self, source: str | None) -> list[str]:
        """`source` checked against the runners (ConfigError naming the choices), or every source."""
        return [self.daemon.runner(source).name] if source is not None else list(self.daemon.runners)

    async def batches(self, source: str | None) -> list[dict[str, Any]]:
        self._names(source)
        rows = await self.daemon.store.batches(source, with_raw=True)
        return [batch_view(b, self.daemon.clock()) for b in rows if b.source in self.daemon.runners]

    async def batch(self, source: str | None, batch_id: str) -> dict[str, Any] | None:
        for name in self._names(source):
            row = await self.daemon.store.batch(name, batch_id)
            if row is not None:
                return batch_view(row, self.daemon.clock())
        return None

    async def track(self, ids: list[str], origin: str, source: str | None) -> tuple[list[str], list[dict[str, Any]]]:
        runner = self.daemon.runner(source)
        added = await runner.track(ids, origin)
        views = []
        for batch_id in runner.canonical(ids):
            row = await self.daemon.store.batch(runner.name, batch_id)
            if row is not None:
                views.append(batch_view(row, self.daemon.clock()))
        return added, views

    async def untrack(self, ids: list[str], source: str | None) -> list[str]:
        if source is not None:
            return await self.daemon.runner(source).untrack(ids)
        removed: list[str] = []
        for runner in self.daemon.runners.values():
            removed += await runner.untrack(ids)
        return removed
