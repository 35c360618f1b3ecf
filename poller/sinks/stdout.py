"""The stdout sink: one JSON event per line (or one readable line), flushed before acknowledging."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Self

from poller.domain.events import Event
from poller.errors import DeliveryError


def text_line(event: Event) -> str:
    """A readable one-line rendering: time, source, batch, transition, normalized request counts."""
    data = event.data
    when = time.strftime("%H:%M:%S", time.localtime(data.detected_at))
    counts = data.request_counts or {}
    progress = f"{counts.get('completed', 0)}/{counts.get('total', 0)} done" if counts.get("total") else ""
    if counts.get("failed"):
        progress += f", {counts['failed']} failed"
    if data.previous_status is None:
        arrow = f"{data.status} (first seen)"
    elif data.previous_status != data.status:
        arrow = f"{data.previous_status} → {data.status}"
    else:
        arrow = data.status
    batch = _printable(data.id)  # ids come from the provider: no control characters reach a terminal
    return f"{when}  {data.source:<9} {batch:<40} {event.type:<18} {arrow:<26} {progress}".rstrip()


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class StdoutSink:
    retry_schedule: Sequence[float] | None = None

    def __init__(
        self, name: str = "stdout", stream: IO[bytes] | None = None, *, text: bool = False, max_in_flight: int = 1
    ) -> None:
        self.name = name
        self.text = text
        self.max_in_flight = max_in_flight
        self._stream = stream

    async def __aenter__(self) -> Self:
        if self._stream is None:
            self._stream = sys.stdout.buffer
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def send(self, event: Event, payload: bytes) -> None:
        assert self._stream is not None, "use the sink as an async context manager"
        line = text_line(event).encode() if self.text else payload
        try:
            self._stream.write(line + b"\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:  # a closed pipe is an outage of this sink, not a crash
            raise DeliveryError(self.name, f"cannot write to stdout: {exc}", retryable=True) from exc

    def health(self) -> str:
        return "ok"
