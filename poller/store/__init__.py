"""The durable state behind the protocols of `poller.store.base`; `open_store` picks the implementation."""

from __future__ import annotations

from pathlib import Path

from poller.store.base import ACTIVE, FINAL, GONE, Store, TrackedBatch


def open_store(path: Path, *, readonly: bool = False) -> Store:
    """The store for a `[state]` config, not yet entered (use it as an async context manager)."""
    from poller.store.sqlite import SqliteStore  # noqa: PLC0415 - each engine loads only when used

    return SqliteStore(path, readonly=readonly)


__all__ = ["ACTIVE", "FINAL", "GONE", "Store", "TrackedBatch", "open_store"]
