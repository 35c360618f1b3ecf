"""Live fan-out of the event log to `/v1/events` clients, without letting any client slow polling.

One reader task (`EventStream`) follows the event log: each recording (and each change another process
committed) wakes it, it reads what is new once, keeps the most recent events in a bounded ring, and
wakes the clients. Every client keeps its own cursor (a log position) and reads from the ring; a client
whose cursor fell behind the ring (it connected with an old `Last-Event-ID`, or it was too slow) reads
from the log itself, with its filters, until it is back in the ring's range. So however many clients
there are, a recording costs one log read, nothing is ever queued for a client, and a stuck client
holds only its own coroutine.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import structlog

from poller.aio import wait_event
from poller.store.base import EventLog, LoggedEvent

log = structlog.get_logger("poller.service.stream")

#: Events the reader keeps in memory for clients that are up to date (a few MB at most: each holds its batch).
RING_SIZE = 1024
#: Events read from the log per query (by the reader, and by a client catching up).
PAGE = 500
#: The reader re-reads the log this often even when nothing woke it (a missed notification).
FALLBACK_READ = 10.0
#: The MQTT-only notice that clears a pruned batch's retained state; never published as an event.
INTERNAL_TYPES = frozenset({"batch.pruned"})


@dataclass(frozen=True, slots=True)
class Filters:
    """What one client asked for; an empty tuple matches everything."""

    sources: tuple[str, ...] = ()
    batch_ids: tuple[str, ...] = ()
    types: tuple[str, ...] = ()

    def match(self, event: LoggedEvent) -> bool:
        return (
            event.type not in INTERNAL_TYPES
            and (not self.sources or event.source in self.sources)
            and (not self.batch_ids or event.batch_id in self.batch_ids)
            and (not self.types or event.type in self.types)
        )


class EventStream:
    """The reader of the event log and the ring clients follow; `start` it, then `notify` it of recordings."""

    def __init__(
        self,
        events: EventLog,
        *,
        ring_size: int = RING_SIZE,
        page: int = PAGE,
        fallback_read: float = FALLBACK_READ,
    ) -> None:
        self._log = events
        self._ring: deque[LoggedEvent] = deque(maxlen=ring_size)
        self._page = page
        self._fallback = fallback_read
        # The ring holds every logged event with a position in (_base, _head].
        self._base = 0
        self._head = 0
        self._wake_reader = asyncio.Event()
        self._moved = asyncio.Event()  # replaced each time the head moves; clients wait on it
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.clients = 0

    @property
    def head(self) -> int:
        """The last log position the reader has read."""
        return self._head

    async def start(self) -> None:
        self._head = self._base = await self._log.last_position()
        self._task = asyncio.create_task(self._read_loop(), name="poller.service.stream")

    async def close(self) -> None:
        """End every client's stream and stop the reader."""
        self._closed.set()
        self._moved.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def notify(self, position: int | None = None) -> None:
        """Something was recorded (up to `position`, when known): read the log. Never blocks."""
        if not position or position > self._head:
            self._wake_reader.set()

    async def _read_loop(self) -> None:
        while True:
            await wait_event(self._wake_reader, self._fallback)
            self._wake_reader.clear()
            try:
                await self._read_new()
            except Exception as exc:  # the store is unavailable: the next wake or fallback read retries
                log.warning("cannot read the event log for the live stream", error=str(exc))

    async def _read_new(self) -> None:
        moved = False
        while True:
            rows = await self._log.read_events(self._head, self._page)
            for row in rows:
                if len(self._ring) == self._ring.maxlen:
                    self._base = self._ring[0].position
                self._ring.append(row)
                self._head = row.position
            moved = moved or bool(rows)
            if len(rows) < self._page:
                break
        if moved:
            moved_event, self._moved = self._moved, asyncio.Event()
            moved_event.set()

    def _newer(self, cursor: int) -> list[LoggedEvent]:
        """The ring's events after `cursor` (which is within the ring's range), oldest first."""
        out: list[LoggedEvent] = []
        for event in reversed(self._ring):
            if event.position <= cursor:
                break
            out.append(event)
        out.reverse()
        return out

    async def start_position(self) -> int:
        """Where a client that asked for no replay starts: the log's current end."""
        return max(self._head, await self._log.last_position())

    async def follow(self, cursor: int, filters: Filters, idle: float) -> AsyncGenerator[Sequence[LoggedEvent], None]:
        """Yield the matching events after `cursor`, in position order, each exactly once, as they come.

        Yields an empty sequence after `idle` seconds without one (time for a heartbeat), and ends when
        the stream closes.
        """
        loop = asyncio.get_running_loop()
        quiet_until = loop.time() + idle
        while not self._closed.is_set():
            moved = self._moved  # taken before looking, so a move while we look is not missed
            if cursor >= self._base:
                new = self._newer(cursor)
                cursor = max(cursor, self._head)
                matching = [e for e in new if filters.match(e)]
                if matching:
                    yield matching
                    quiet_until = loop.time() + idle
                    continue
                if not await wait_event(moved, quiet_until - loop.time()):
                    yield ()
                    quiet_until = loop.time() + idle
                continue
            # Behind the ring: catch up from the log. Everything up to `head` is in the log already.
            head = self._head
            rows = await self._log.read_events(
                cursor, self._page, sources=filters.sources, batch_ids=filters.batch_ids, types=filters.types
            )
            last = rows[-1].position if rows else cursor
            cursor = last if len(rows) == self._page else max(last, head)
            matching = [e for e in rows if filters.match(e)]
            if matching:
                yield matching
                quiet_until = loop.time() + idle


__all__ = ["EventStream", "Filters"]
