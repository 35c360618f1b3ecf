"""The sink interface every destination implements, and how its retries are paced."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self

from poller.domain.events import Event


class Sink(Protocol):
    """A destination for events.

    `send` returns only once the destination acknowledged the event (fsync, PUBACK, HTTP 2xx) and raises
    `poller.errors.DeliveryError` otherwise. It may be called concurrently for different batches, never
    for two events of one batch. `payload` is the event's canonical JSON (the `openai` format).
    The context manager owns connections and background tasks.
    """

    name: str
    #: How many sends may be in flight at once.
    max_in_flight: int
    #: Delays between attempts; None retries forever with capped exponential backoff.
    retry_schedule: Sequence[float] | None

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def send(self, event: Event, payload: bytes) -> None: ...

    def health(self) -> str:
        """A short word for status lines: ok, connecting, failing, disabled."""
        ...
