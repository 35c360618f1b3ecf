"""One source's API health, as readiness, `status` and the logs see it.

Logged on transitions only (as Home Assistant's DataUpdateCoordinator does): an outage once when it
starts and once when it ends, rejected credentials once, a misconfigured `base_url` once; single
failures go to debug.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from poller.errors import ApiError
from poller.metrics import SourceMetrics

log = structlog.get_logger("poller.source")

#: Longest pause after repeated credential rejections.
MAX_AUTH_PAUSE = 3600.0


@dataclass(slots=True)
class SourceHealth:
    source: str
    metrics: SourceMetrics
    started_at: float
    last_success: float | None = None
    api_failing_since: float | None = None
    auth_failing: bool = False
    auth_paused_until: float = 0.0
    auth_failures: int = 0
    #: Why the API looks misconfigured (a wrong base_url), or None.
    misconfigured: str | None = None
    #: Set when the list endpoint is missing (a JSON 404/405): refresh then retrieves one by one.
    list_unavailable: bool = False
    _warned: dict[str, str] = field(default_factory=dict)

    def ok(self, now: float) -> None:
        self.last_success = now
        if self.auth_failing:
            self.auth_failing = False
            self.auth_failures = 0
            log.info("the Batch API accepts the credentials again; polling resumed", source=self.source)
        if self.api_failing_since is not None:
            outage = round(now - self.api_failing_since, 1)
            log.info("Batch API recovered", source=self.source, outage_seconds=outage)
            self.api_failing_since = None
        self._update_gauge()

    def failed(self, exc: ApiError, now: float, batch_id: str | None = None) -> None:
        """A failed request that is neither an auth rejection nor a 404 (those have their own paths)."""
        fields = {"source": self.source, "error": str(exc), "status": exc.status, "request_id": exc.request_id}
        if exc.kind in {"transport", "server", "rate_limited"} and self.api_failing_since is None:
            self.api_failing_since = now
            log.warning("Batch API unreachable; backing off until it answers", **fields)
        else:
            log.debug("Batch API request failed", batch_id=batch_id, **fields)
        self._update_gauge()

    def auth_failed(self, exc: ApiError, now: float, base_pause: float) -> float:
        """Credentials rejected: returns until when polling pauses (doubling while it keeps happening)."""
        if now >= self.auth_paused_until:  # the first rejection after a pause ended: the pause doubles
            self.auth_failures += 1
        pause = min(base_pause * 2 ** (self.auth_failures - 1), MAX_AUTH_PAUSE)
        self.auth_paused_until = max(self.auth_paused_until, now + pause)
        if not self.auth_failing:
            self.auth_failing = True
            log.error(
                "THE BATCH API REJECTS THE CREDENTIALS: polling of this source is paused; check its api_key_env "
                "or api_key_file",
                source=self.source,
                status=exc.status,
                request_id=exc.request_id,
                retry_in=round(pause),
            )
        self._update_gauge()
        return self.auth_paused_until

    def set_misconfigured(self, reason: str | None) -> None:
        if reason == self.misconfigured:
            return
        if reason is not None:
            log.error("the Batch API looks misconfigured", reason=reason, source=self.source, fix="check base_url")
        elif self.misconfigured is not None:
            log.info("the Batch API answers properly again", source=self.source)
        self.misconfigured = reason
        self._update_gauge()

    def warn_once(self, key: str, message: str, **fields: object) -> None:
        """Log a warning the first time `key` says `message`, debug after that (a batch that stays bad)."""
        if self._warned.get(key) == message:
            log.debug(message, source=self.source, **fields)
            return
        if len(self._warned) > 10_000:
            self._warned.clear()
        self._warned[key] = message
        log.warning(message, source=self.source, **fields)

    def reset_auth(self) -> None:
        """A new config may carry a corrected key: try again at once instead of waiting out the pause."""
        self.auth_paused_until, self.auth_failures = 0.0, 0

    def reasons(self, now: float, recent: float, *, tracking: bool) -> list[str]:
        """Why this source is not ready (empty when it is)."""
        reasons = []
        if self.auth_failing:
            reasons.append(f"{self.source}: the Batch API rejects the credentials")
        if self.misconfigured is not None:
            reasons.append(f"{self.source}: {self.misconfigured}; check base_url")
        last = self.last_success if self.last_success is not None else self.started_at
        if tracking and now - last > recent:
            reasons.append(f"{self.source}: no successful poll in the last {recent:g}s")
        return reasons

    @property
    def up(self) -> bool:
        return not (self.auth_failing or self.misconfigured or self.api_failing_since is not None)

    def _update_gauge(self) -> None:
        self.metrics.up.set(1 if self.up else 0)
