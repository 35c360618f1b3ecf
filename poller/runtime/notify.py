"""The systemd notification protocol (``sd_notify(3)``), written out so that no libsystemd is needed.

`Notifier.from_env()` reads ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. Every message is
one ``AF_UNIX`` datagram of ``KEY=value`` lines; an address starting with ``@`` is in Linux's abstract
namespace. Without ``NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every method is a
no-op that returns False. Sending never raises and never logs: the daemon must run the same whether or
not anyone listens, so each method only reports whether the datagram left.

The socket is non-blocking: a notification is never worth stalling the event loop for, and systemd's
receive queue is large enough that a full one means the manager is wedged anyway.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

__all__ = ["Notifier", "watchdog_loop"]

_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _positive_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


class Notifier:
    """A connection to the service manager's notification socket (or a no-op without one)."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        """`address` is ``NOTIFY_SOCKET`` as systemd sets it: an absolute path or ``@abstract-name``.

        Anything else (None, empty, relative, or a ``vsock:`` address of newer systemd) disables
        notifications. `watchdog_usec` is the watchdog timeout, already checked against
        ``WATCHDOG_PID``; None disables the watchdog.
        """
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address and address[0] in "/@" and len(address) > 1:
            self._address = "\0" + address[1:] if address[0] == "@" else address
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError:
                self._address = None
            else:
                sock.settimeout(0.0)  # non-blocking
                self._sock = sock
        self._watchdog_usec = watchdog_usec if self._sock is not None else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """A notifier for the environment systemd gave this process (`os.environ` by default).

        The watchdog is honoured only if ``WATCHDOG_PID`` is unset or names this process: a child
        that inherited the variables must not ping on its parent's behalf.
        """
        env = os.environ if environ is None else environ
        usec = _positive_int(env.get("WATCHDOG_USEC"))
        pid_text = env.get("WATCHDOG_PID")
        if pid_text is not None and _positive_int(pid_text) != os.getpid():
            usec = None
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (False outside systemd or after `close`)."""
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), None without a watchdog."""
        if self._watchdog_usec is None or self._sock is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def send(self, **fields: object) -> bool:
        """Send one datagram of ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="polling")``.

        Keys must be upper-case protocol names (a lower-case or empty key is a programming error and
        raises ValueError); newlines inside values are replaced by spaces, since they would start a
        new field. Returns True if the datagram was sent, False if disabled or the send failed.
        """
        for key in fields:
            if not _KEY.match(key):
                raise ValueError(f"not a notification field name: {key!r}")
        if self._sock is None or self._address is None or not fields:
            return False
        payload = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()) + "\n"
        try:
            self._sock.sendto(payload.encode("utf-8", "replace"), self._address)
        except OSError:
            return False
        return True

    def ready(self) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send(READY=1)

    def reloading(self) -> bool:
        """A reload began; send `ready` when it is done.

        Carries ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in µs), which ``Type=notify-reload`` requires
        (systemd ≥ 253) to tell this reload's READY=1 from an earlier one; ``Type=notify`` ignores it.
        """
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        """Shutdown began (the daemon is draining)."""
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """Tell the watchdog the daemon is alive."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket; later calls are no-ops. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        shown = None if self._address is None else self._address.replace("\0", "@", 1)
        return f"Notifier(address={shown!r}, watchdog_interval={self.watchdog_interval!r})"


def _one_line(value: object) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")


async def watchdog_loop(notifier: Notifier, alive: Callable[[], bool]) -> None:
    """Ping the watchdog every `notifier.watchdog_interval` seconds while `alive()` is True.

    Runs until cancelled; returns at once when no watchdog is configured. When `alive()` is False (the
    poll loop has stopped ticking) it keeps checking but sends nothing, so systemd's WatchdogSec= runs
    out and the service is restarted; it resumes pinging if `alive()` recovers first. An exception
    from `alive()` propagates and ends the loop, which also lets the watchdog expire.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        if alive():
            notifier.watchdog()
        await asyncio.sleep(interval)
