"""The file sink: appends JSON lines and fsyncs before acknowledging, so an acknowledged event is on disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from poller.domain.events import Event
from poller.errors import DeliveryError


class FileSink:
    retry_schedule: Sequence[float] | None = None

    def __init__(self, name: str, path: Path, max_in_flight: int = 64) -> None:
        self.name = name
        self.path = path
        self.max_in_flight = max_in_flight
        self._fd: int | None = None
        # Lines waiting for the writer, in the order `send` was called, each with its acknowledgement.
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._healthy = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._writer is not None:
            await asyncio.wait((self._writer,))
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return self._fd

    def _append(self, line: bytes) -> None:
        fd = self._open()
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(line)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError:
            # A full disk may have taken half a line: cut it off so the file stays whole JSON lines.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise

    async def send(self, event: Event, payload: bytes) -> None:
        """Return once the line is on disk. Concurrent sends share one write and one fsync (group commit)."""
        del event
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((payload + b"\n", done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_pending(), name=f"poller.file[{self.name}].writer")
        await done

    async def _write_pending(self) -> None:
        """Append whatever is pending, one group at a time: whole lines, in the order they were sent."""
        try:
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    await asyncio.to_thread(self._append, b"".join(line for line, _ in group))
                except OSError as exc:
                    self._healthy = False
                    if self._fd is not None:
                        os.close(self._fd)
                        self._fd = None
                    error = DeliveryError(self.name, f"cannot append to {self.path}: {exc.strerror}", retryable=True)
                    for _, done in group:
                        if not done.done():
                            done.set_exception(error)
                    continue
                self._healthy = True
                for _, done in group:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._writer = None

    def health(self) -> str:
        return "ok" if self._healthy else "failing"
