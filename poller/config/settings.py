"""The sections besides sources and sinks: `[poll]`, `[state]`, `[log]`, `[service]`."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal, Self
from urllib.parse import parse_qs, urlsplit

import platformdirs
from pydantic import Field, field_validator, model_validator

from poller.config.base import Section
from poller.config.secrets import read_secret, secret_pair_check
from poller.durations import Duration
from poller.errors import ConfigError

INTERVAL_KEYS = ("validating", "in_progress", "finalizing", "cancelling")


class PollConfig(Section):
    #: Detection latency target: how often the list pages holding active batches are walked (one page
    #: every `latency`; each tenfold more pages adds one `latency`), within max_requests_per_second.
    latency: Duration = 15.0
    validating: Duration = 10.0
    in_progress: Duration = 30.0
    finalizing: Duration = 10.0
    cancelling: Duration = 10.0
    growth: float = Field(default=1.5, ge=1.0, le=10.0)
    max_interval: Duration = 300.0
    error_backoff: Duration = 5.0
    max_error_backoff: Duration = 600.0
    auth_backoff: Duration = 60.0
    discover_interval: Duration = 60.0
    max_concurrency: int = Field(default=8, ge=1, le=256)
    max_requests_per_second: float = Field(default=10.0, gt=0)
    progress: bool = True
    progress_interval: Duration = 60.0
    stall_after: Duration = 1800.0
    expiry_warning: Duration = 3600.0
    gone_after: int = Field(default=3, ge=1)
    retention: Duration = 7 * 86400.0

    def base_intervals(self) -> dict[str, float]:
        """Base poll interval by status, for `poller.domain.schedule.Intervals`."""
        return {s: getattr(self, s) for s in INTERVAL_KEYS}

    @model_validator(mode="after")
    def _positive(self) -> Self:
        for key in (*INTERVAL_KEYS, "max_interval", "latency"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be longer than 0s")
        return self


class StateConfig(Section):
    path: Path | None = None
    #: A PostgreSQL URL (postgresql://user@host:port/db) selects the shared store; its password comes
    #: from password_env or password_file, never the URL.
    url: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    #: This replica's name in leases, outbox claims, /v1/status, metrics and logs (PostgreSQL);
    #: default `<host name>:<pid>`.
    replica_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:@-]{1,200}$")
    #: How long a replica's lease on a source lasts; it is renewed every third of it (PostgreSQL).
    lease_ttl: Duration = Field(default=30.0, ge=3.0, le=3600.0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("url must be a PostgreSQL URL, postgresql://user@host:5432/database")
        if parts.password is not None or "password" in parse_qs(parts.query):
            raise ValueError("url holds a password: remove it and set state.password_env or state.password_file")
        return value

    @model_validator(mode="after")
    def _engine(self) -> Self:
        secret_pair_check(self, "password", required=False)
        if self.url is not None and self.path is not None:
            raise ValueError("set only one of path (SQLite) and url (PostgreSQL)")
        if self.url is None and (self.password_env is not None or self.password_file is not None):
            raise ValueError("password_env and password_file go with url (PostgreSQL)")
        return self

    def password(self, environ: dict[str, str] | None = None) -> str | None:
        """The PostgreSQL password, None when none is configured; ConfigError when it cannot be read."""
        if self.password_env is None and self.password_file is None:
            return None
        return read_secret("state.password", self.password_env, self.password_file, environ)

    def check(self, environ: dict[str, str] | None = None) -> None:
        """What start-up checks before opening the store: a writable file, or a readable password."""
        if self.url is None:
            self.check_usable(environ)
        else:
            self.password(environ)

    def db_path(self, environ: dict[str, str] | None = None) -> Path:
        environ = dict(os.environ) if environ is None else environ
        if self.path is not None:
            return self.path
        if environ.get("STATE_DIRECTORY"):
            # systemd may pass several directories separated by ':'; the first is ours.
            return Path(environ["STATE_DIRECTORY"].split(":")[0]) / "state.db"
        return Path(platformdirs.user_state_dir("batch-poller")) / "state.db"

    def check_usable(self, environ: dict[str, str] | None = None) -> Path:
        """The state file's path, or ConfigError when it cannot be created or written there."""
        path = self.db_path(environ)
        if path.is_dir():
            raise _state_error(path, "is a directory", "point state.path at a file inside it, e.g. state.db")
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise _state_error(path, f"{ancestor} is not a directory", "choose a path whose parents are directories")
        target = path if path.exists() else ancestor
        if not os.access(target, os.W_OK):
            raise _state_error(
                path, f"{target} is not writable by this user", "fix its permissions or choose another path"
            )
        return path


def _state_error(path: Path, problem: str, fix: str) -> ConfigError:
    return ConfigError("state.path", f"cannot use {path}: {problem}", fix)


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ServiceConfig(Section):
    listen: str = "127.0.0.1:9464"
    enabled: bool = True
    token_env: str | None = None
    token_file: Path | None = None
    shutdown_timeout: Duration = 10.0

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        # A field validator, so that an error names service.listen rather than the whole section.
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError("listen must be HOST:PORT, for example 127.0.0.1:9464")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"the port {port} is not from 1 to 65535 (0 picks a free one)")
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        secret_pair_check(self, "token", required=False)
        if self.enabled and not self.is_loopback and self.token_env is None and self.token_file is None:
            raise ValueError(
                f"listen {self.listen} is not a loopback address: set token_env or token_file so the control API "
                "requires a bearer token, or listen on 127.0.0.1"
            )
        return self

    @property
    def is_loopback(self) -> bool:
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def has_token(self) -> bool:
        return self.token_env is not None or self.token_file is not None
