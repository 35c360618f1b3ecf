"""Which sinks take an event: each sink's filters (types, sources, metadata) and, for internal events,
whether its kind keeps per-batch state they must reach."""

from __future__ import annotations

from collections.abc import Mapping

from poller.config.sinks import SinkConfig
from poller.domain.events import INTERNAL_TYPES
from poller.sinks.registry import sink_kind


class Routes:
    """The routing table of a set of sinks; call it with (type, metadata, source).

    Without a metadata filter on any sink the answer depends on (type, source) only, so it is worked out
    once per pair (the recorder asks for every event it records).
    """

    def __init__(self, sinks: Mapping[str, SinkConfig]) -> None:
        self._sinks = [(name, cfg, sink_kind(cfg.kind).keeps_state) for name, cfg in sinks.items()]
        self._by_metadata = any(cfg.metadata for _, cfg, _ in self._sinks)
        self._known: dict[tuple[str, str], tuple[str, ...]] = {}

    def __call__(self, event_type: str, metadata: Mapping[str, str] | None, source: str) -> list[str]:
        if self._by_metadata:
            return self._route(event_type, metadata, source)
        key = (event_type, source)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = tuple(self._route(event_type, None, source))
        return list(known)

    def _route(self, event_type: str, metadata: Mapping[str, str] | None, source: str) -> list[str]:
        if event_type in INTERNAL_TYPES:
            return [n for n, cfg, keeps in self._sinks if keeps and (not cfg.sources or source in cfg.sources)]
        meta = dict(metadata or {})
        return [n for n, cfg, _ in self._sinks if cfg.wants(event_type, meta, source)]
