"""The durable state behind the protocols of `poller.store.base`; `open_store` picks the implementation."""

from __future__ import annotations

from pathlib import Path

from poller.config.settings import StateConfig
from poller.store.base import ACTIVE, FINAL, GONE, Store, TrackedBatch


def open_store(
    state: StateConfig | Path,
    environ: dict[str, str] | None = None,
    *,
    readonly: bool = False,
    name: str | None = None,
) -> Store:
    """The store for a `[state]` config (or a SQLite file's path), not yet entered (use it as an async
    context manager). `[state] url` selects PostgreSQL, else SQLite at the checked `path`; raises
    ConfigError for an unusable file or an unreadable password. `name` is the replica's (PostgreSQL).
    """
    # Each engine loads only when used.
    if isinstance(state, StateConfig) and state.url is not None:
        from psycopg.conninfo import make_conninfo  # noqa: PLC0415

        from poller.store.postgres import PostgresStore  # noqa: PLC0415

        password = state.password(environ)
        conninfo = state.url if password is None else make_conninfo(state.url, password=password)
        return PostgresStore(conninfo, state.url, name=name, claim_ttl=2 * state.lease_ttl)
    from poller.store.sqlite import SqliteStore  # noqa: PLC0415

    path = state.check_usable(environ) if isinstance(state, StateConfig) else state
    return SqliteStore(path, readonly=readonly)


__all__ = ["ACTIVE", "FINAL", "GONE", "Store", "TrackedBatch", "open_store"]
