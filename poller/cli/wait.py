"""`batch-poller wait ID...`: block until every batch is final, showing its progress, and say how they
ended in the exit code.

Batches the running daemon tracks are followed on its event stream (`GET /v1/events`, resumed with
`Last-Event-ID` after a dropped connection); the others, or all of them when no daemon answers, are
retrieved from the provider's API every `[poll] latency`, with the ETA measured the daemon's way.

Exit codes, the first that applies when batches end differently: 124 `--timeout` passed first; 1 a
batch that the API (or the daemon) does not know, or a key the API rejects; 3 any failed; 4 any
expired; 5 any cancelled; 0 all completed. 78 is a bad configuration, 2 a usage error, as for every
command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO
from urllib.parse import quote

import aiohttp

from poller.cli.api import failure_text, provider_for
from poller.cli.daemon import service_headers, service_url
from poller.cli.render import bar, done_text, eta_text, iso, printable
from poller.config import Config, SourceConfig
from poller.domain.lifecycle import is_final
from poller.domain.schedule import error_delay
from poller.domain.transitions import Knowledge, Policy, detect
from poller.errors import ApiError, BadResponseError
from poller.providers import canonical_id

EXIT_COMPLETED, EXIT_UNKNOWN, EXIT_FAILED, EXIT_EXPIRED, EXIT_CANCELLED, EXIT_TIMEOUT = 0, 1, 3, 4, 5, 124
#: Final statuses other than `completed`, worst first: with several, the first one present decides.
OUTCOMES = (("failed", EXIT_FAILED), ("expired", EXIT_EXPIRED), ("cancelled", EXIT_CANCELLED))
#: A silent stream is dead after this long (the daemon sends a keep-alive comment every 15 s).
STREAM_READ_TIMEOUT = 45.0
#: Event frames carry whole batch bodies: allow lines far longer than aiohttp's default.
STREAM_LINE_LIMIT = 8 * 1024 * 1024

Mode = Literal["tty", "lines", "json"]


@dataclass(slots=True)
class Watched:
    """One batch as `wait` last saw it."""

    id: str
    source: str | None = None
    status: str | None = None
    counts: dict[str, int] | None = None
    eta: int | None = None
    #: The batch's event sequence (daemon views and events), so an older answer never undoes a newer one.
    sequence: int = -1
    #: Why it cannot be followed (an id the API does not know); settles it.
    problem: str | None = None

    @property
    def settled(self) -> bool:
        return self.problem is not None or (self.status is not None and is_final(self.status))


@dataclass
class Board:
    """What `wait` knows of every batch; `on_change` hears of each change."""

    batches: dict[str, Watched]
    on_change: Callable[[Watched], None] = lambda _w: None
    #: Set once the outcome is known: every batch settled, or one that cannot be followed.
    decided: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def of(cls, ids: Iterable[str]) -> Board:
        return cls({i: Watched(i) for i in ids})

    def settled(self, ids: Iterable[str] | None = None) -> bool:
        return all(self.batches[i].settled for i in (self.batches if ids is None else ids))

    def update(
        self,
        batch_id: str,
        *,
        status: str | None,
        counts: dict[str, int] | None,
        eta: int | None,
        sequence: int | None = None,
        source: str | None = None,
        event: bool = False,
    ) -> None:
        """Apply what a poll, a daemon view or (`event`) an event showed. An event no newer than what is
        known is skipped: the view of the same sequence may have fresher counts."""
        w = self.batches.get(batch_id)
        if w is None or w.settled:
            return
        if sequence is not None:
            if sequence < w.sequence or (event and sequence == w.sequence):
                return
            w.sequence = sequence
        status = status or w.status
        if (status, counts, eta) == (w.status, w.counts, w.eta):
            return
        w.status, w.counts, w.eta, w.source = status, counts, eta, source or w.source
        self.on_change(w)
        if self.settled():
            self.decided.set()

    def fail(self, batch_id: str, problem: str) -> None:
        w = self.batches[batch_id]
        if not w.settled:
            w.problem = problem
            self.on_change(w)
            self.decided.set()  # a batch that cannot be followed ends the wait at once

    def exit_code(self) -> int:
        if any(w.problem for w in self.batches.values()):
            return EXIT_UNKNOWN
        statuses = {w.status for w in self.batches.values()}
        return next((code for status, code in OUTCOMES if status in statuses), EXIT_COMPLETED)


# -- showing progress ----------------------------------------------------------------------------------


class Display:
    """Progress on `out`: a line per batch redrawn in place on a terminal, a line per change when piped,
    or one JSON object per change."""

    def __init__(self, out: TextIO, mode: Mode, clock: Callable[[], float] = time.time) -> None:
        self.out, self.mode, self.clock = out, mode, clock
        self.board: Board | None = None
        self._drawn = 0

    def attach(self, board: Board) -> None:
        self.board = board
        board.on_change = self.changed

    def changed(self, w: Watched) -> None:
        if self.mode == "json":
            record = {
                "id": w.id,
                "source": w.source,
                "status": w.status,
                "request_counts": w.counts,
                "eta": w.eta,
                "final": w.settled,
                "problem": w.problem,
            }
            print(json.dumps(record, separators=(",", ":")), file=self.out, flush=True)
        elif self.mode == "lines":
            print(f"{iso(self.clock())}  {self._line(w, plain=True)}", file=self.out, flush=True)
        else:
            self.redraw()

    def note(self, message: str) -> None:
        """A warning on stderr; on a terminal the lines are drawn afresh below it."""
        print(f"wait: {message}", file=sys.stderr, flush=True)
        self._drawn = 0

    def redraw(self) -> None:
        if self.board is None:
            return
        now = self.clock()
        width = max(len(printable(i)) for i in self.board.batches)
        lines = [self._line(w, now=now, width=width) for w in self.board.batches.values()]
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.out.flush()
        self._drawn = len(lines)

    def _line(self, w: Watched, *, plain: bool = False, now: float = 0.0, width: int = 0) -> str:
        shown = printable(w.id).ljust(width)
        if w.problem:
            return f"{shown}  {printable(w.problem)}"
        status = printable(w.status or "(waiting)")
        done = done_text(w.counts)
        if plain:
            return f"{shown}  {status}  {done}  eta {iso(w.eta)}"
        counts = w.counts or {}
        progress = bar(counts.get("completed", 0) + counts.get("failed", 0), counts.get("total", 0))
        return f"{shown}  {status:<11}  {progress}  {done:>11}  eta {eta_text(w.eta, now)}"

    def summary(self, code: int, timeout: float | None) -> None:
        """One closing line (none in JSON mode: the exit code says it)."""
        if self.mode == "json" or self.board is None:
            return
        batches = self.board.batches.values()
        if code == EXIT_TIMEOUT:
            waiting = sum(1 for w in batches if not w.settled)
            print(f"timed out after {timeout:g}s: {waiting} batch(es) not final", file=self.out)
            return
        tally: dict[str, int] = {}
        for w in batches:
            key = "unknown" if w.problem else (w.status or "?")
            tally[key] = tally.get(key, 0) + 1
        print("done: " + ", ".join(f"{n} {s}" for s, n in sorted(tally.items())), file=self.out)


# -- following the daemon ------------------------------------------------------------------------------


@dataclass(slots=True)
class Frame:
    """One Server-Sent Events message."""

    id: str | None
    event: str
    data: str


async def read_frames(lines: AsyncIterable[bytes]) -> AsyncIterator[Frame]:
    """The messages of an event stream, line by line as the SSE format has them (comments skipped)."""
    last_id: str | None = None
    event, data = "message", list[str]()
    async for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield Frame(last_id, event, "\n".join(data))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            last_id = value
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)


@dataclass
class DaemonFeed:
    """The batches the running daemon tracks: their views, then its event stream."""

    base: str
    headers: dict[str, str]
    source: str | None
    board: Board
    warn: Callable[[str], None]
    ids: list[str] = field(default_factory=list)

    def _params(self) -> list[tuple[str, str]]:
        return [] if self.source is None else [("source", self.source)]

    async def view(self, http: aiohttp.ClientSession, batch_id: str) -> dict[str, Any] | None:
        """The daemon's view of one batch, None when it does not track it."""
        url = f"{self.base}/v1/batches/{quote(batch_id, safe='')}"
        async with http.get(url, params=self._params(), headers=self.headers) as resp:
            if resp.status == 404:
                return None
            resp.raise_for_status()
            body: dict[str, Any] = await resp.json()
            return body

    def apply_view(self, view: dict[str, Any]) -> None:
        batch_id = str(view.get("id"))
        if view.get("state") == "gone":
            self.board.fail(batch_id, "gone: the API answers that it does not know this batch")
            return
        self.board.update(
            batch_id,
            status=view.get("status"),
            counts=view.get("request_counts"),
            eta=view.get("eta"),
            sequence=view.get("sequence"),
            source=view.get("source"),
        )

    def apply_event(self, frame: Frame) -> None:
        try:
            event = json.loads(frame.data)
            data = event["data"]
            self.board.update(
                str(data["id"]),
                status=data.get("status"),
                counts=data.get("request_counts"),
                eta=data.get("eta"),
                sequence=int(data["sequence"]),
                source=data.get("source"),
                event=True,
            )
        except (ValueError, KeyError, TypeError):
            self.warn("ignored a malformed event on the daemon's stream")

    async def refresh(self, http: aiohttp.ClientSession) -> None:
        for batch_id in self.ids:
            view = await self.view(http, batch_id)
            if view is None:
                self.board.fail(batch_id, "no longer tracked by the daemon")
            else:
                self.apply_view(view)

    async def follow(self, http: aiohttp.ClientSession, interval: float) -> None:
        """Until every batch of `ids` is settled: the stream, reconnecting (and resuming) when it drops."""
        last_id: str | None = None
        failures = 0
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=STREAM_READ_TIMEOUT)
        while not self.board.settled(self.ids):
            params = self._params() + [("batch", i) for i in self.ids if not self.board.batches[i].settled]
            headers = self.headers | {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            try:
                async with http.get(f"{self.base}/v1/events", params=params, headers=headers, timeout=timeout) as resp:
                    if resp.status == 404:
                        # a daemon without the stream: read its views instead
                        await self._poll_views(http, interval)
                        return
                    resp.raise_for_status()
                    # the stream is open: anything recorded from now on arrives on it, so the views
                    # cover what happened before (and while reconnecting)
                    await self.refresh(http)
                    failures = 0
                    async for frame in read_frames(resp.content):
                        last_id = frame.id or last_id
                        self.apply_event(frame)
                        if self.board.settled(self.ids):
                            return
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: an overlong line
                failures += 1
                if failures == 1:
                    self.warn(f"lost the daemon's event stream ({printable(exc) or type(exc).__name__}); reconnecting")
            await asyncio.sleep(min(0.25 * 2**failures, 10.0) if failures else 0.0)

    async def _poll_views(self, http: aiohttp.ClientSession, interval: float) -> None:
        while not self.board.settled(self.ids):
            await self.refresh(http)
            if not self.board.settled(self.ids):
                await asyncio.sleep(interval)


# -- polling the API -----------------------------------------------------------------------------------


async def poll_api(
    source: SourceConfig,
    *,
    ids: list[str],
    board: Board,
    interval: float,
    warn: Callable[[str], None],
    clock: Callable[[], float] = time.time,
) -> None:
    """Retrieve every unsettled batch of `ids` each `interval` until all are settled.

    Detection's own knowledge of each batch gives its status and its ETA, as the daemon would.
    """
    known: dict[str, Knowledge] = {}
    streaks: dict[str, int] = {}
    rand = random.Random().random
    policy = Policy(progress=False)
    async with provider_for(source) as provider:
        while not board.settled(ids):
            delay = interval
            for batch_id in [i for i in ids if not board.batches[i].settled]:
                try:
                    snap = await provider.retrieve(batch_id)
                except ApiError as exc:
                    if exc.status == 404 and exc.from_api and not isinstance(exc, BadResponseError):
                        board.fail(batch_id, "not found: the API does not know this batch")
                    elif exc.status in {401, 403}:
                        for i in ids:
                            board.fail(i, f"the API rejects the key: {failure_text(exc)}")
                    else:
                        streaks[batch_id] = streak = streaks.get(batch_id, 0) + 1
                        if streak == 1:
                            warn(f"{printable(batch_id)}: {printable(failure_text(exc))}; retrying")
                        delay = max(delay, error_delay(streak, interval, 60.0, rand, exc.retry_after))
                    continue
                streaks.pop(batch_id, None)
                now = clock()
                knowledge = known[batch_id] = detect(known.get(batch_id, Knowledge()), snap, now, policy).knowledge
                board.update(
                    batch_id,
                    status=knowledge.status,
                    counts=None if snap.counts is None else snap.counts.as_dict(),
                    eta=knowledge.eta(now),
                    source=source.source_name,
                )
            if not board.settled(ids):
                await asyncio.sleep(delay)


# -- the command ---------------------------------------------------------------------------------------


def _canonical(config: Config, source: str | None, ids: list[str]) -> list[str]:
    sources = config.named_sources()
    name = source if source is not None else (next(iter(sources)) if len(sources) == 1 else None)
    if name is None:
        return list(dict.fromkeys(ids))
    return list(dict.fromkeys(canonical_id(sources[name].provider_name, i) for i in ids))


async def _daemon_feed(
    config: Config, source: str | None, board: Board, warn: Callable[[str], None]
) -> DaemonFeed | None:
    """The daemon's feed of the batches it tracks, None when no daemon answers."""
    base = service_url(config)
    if base is None:
        return None
    feed = DaemonFeed(base, service_headers(config), source, board, warn)
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{base}/v1/status", headers=feed.headers) as resp:
                if resp.status in {401, 403}:
                    warn(f"the daemon at {base} refuses the service token; asking the API instead")
                if resp.status != 200:
                    return None
            for batch_id in board.batches:
                view = await feed.view(http, batch_id)
                if view is not None:
                    feed.ids.append(batch_id)
                    feed.apply_view(view)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return feed


async def wait(args: argparse.Namespace, config: Config, out: TextIO = sys.stdout) -> int:
    """Wait for `args.ids`; the exit code says how they ended (module docstring)."""
    from poller.cli.state import pick_source  # noqa: PLC0415 - state imports the store

    source = None if args.source is None else pick_source(config, args.source)
    mode: Mode = "json" if args.json else ("tty" if out.isatty() else "lines")
    display = Display(out, mode)
    board = Board.of(_canonical(config, source, args.ids))
    display.attach(board)

    warn = display.note
    feed = await _daemon_feed(config, source, board, warn)
    direct = [i for i in board.batches if feed is None or i not in feed.ids]
    if mode == "tty":
        display.redraw()
    interval = config.poll.latency
    async with aiohttp.ClientSession(read_bufsize=STREAM_LINE_LIMIT) as http:
        tasks = []
        if feed is not None and feed.ids:
            tasks.append(asyncio.create_task(feed.follow(http, interval), name="wait.follow"))
        if direct:
            polled = config.named_sources()[pick_source(config, source)]
            polled.api_key()  # a missing key is a configuration error (78), before anything waits
            polling = poll_api(polled, ids=direct, board=board, interval=interval, warn=warn)
            tasks.append(asyncio.create_task(polling, name="wait.poll"))
        try:
            code = await _settle(tasks, board, args.timeout)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    display.summary(code, args.timeout)
    return code


async def _settle(tasks: list[asyncio.Task[None]], board: Board, limit: float | None) -> int:
    """Wait until the outcome is known (re-raising a feed's crash); 124 when `limit` passes first."""
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    decided = asyncio.create_task(board.decided.wait(), name="wait.decided")
    try:
        pending: set[asyncio.Task[Any]] = {decided, *tasks}
        while not board.decided.is_set() and len(pending) > 1:
            left = None if deadline is None else max(deadline - loop.time(), 0.0)
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return EXIT_TIMEOUT
            for task in done:
                task.result()
    finally:
        decided.cancel()
    return board.exit_code() if board.decided.is_set() else EXIT_TIMEOUT
