"""poller.notify against real AF_UNIX datagram sockets that stand in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from poller.runtime.notify import Notifier, watchdog_loop


class Receiver:
    """A bound datagram socket playing the service manager's side of NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(2.0)

    def recv(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n")
        return dict(line.split("=", 1) for line in data.splitlines())

    def drain(self) -> list[dict[str, str]]:
        """Every datagram queued so far, without waiting."""
        self.sock.settimeout(0.0)  # non-blocking
        out: list[dict[str, str]] = []
        try:
            while True:
                data = self.sock.recv(4096).decode()
                out.append(dict(line.split("=", 1) for line in data.splitlines()))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sockaddr_un paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="bpn-") as name:
        yield Path(name)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[Receiver]:
    r = Receiver(str(short_dir / "notify.sock"))
    yield r
    r.sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    r = Receiver(f"@batch-poller-test-{uuid.uuid4().hex}")
    yield r
    r.sock.close()


def notifier_for(receiver: Receiver, **extra: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": receiver.address, **extra})


def test_lifecycle_messages_arrive_one_datagram_each(receiver: Receiver) -> None:
    with notifier_for(receiver) as n:
        assert n.enabled
        assert n.ready() is True
        assert receiver.recv() == {"READY": "1"}
        assert n.status("polling 3 batches") is True
        assert receiver.recv() == {"STATUS": "polling 3 batches"}
        assert n.watchdog() is True
        assert receiver.recv() == {"WATCHDOG": "1"}
        assert n.stopping() is True
        assert receiver.recv() == {"STOPPING": "1"}
    assert receiver.drain() == []


def test_reloading_carries_monotonic_usec(receiver: Receiver) -> None:
    with notifier_for(receiver) as n:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.reloading() is True
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = receiver.recv()
    assert set(msg) == {"RELOADING", "MONOTONIC_USEC"}
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_abstract_namespace_address(abstract_receiver: Receiver) -> None:
    assert abstract_receiver.address.startswith("@")
    with notifier_for(abstract_receiver) as n:
        assert n.ready() is True
        assert n.status("ok") is True
    assert abstract_receiver.recv() == {"READY": "1"}
    assert abstract_receiver.recv() == {"STATUS": "ok"}


def test_generic_send_is_one_datagram_and_keeps_lines_intact(receiver: Receiver) -> None:
    with notifier_for(receiver) as n:
        assert n.send(READY=1, STATUS="line one\nline two") is True
        assert n.send() is False  # nothing to say
        with pytest.raises(ValueError, match="field name"):
            n.send(ready=1)
    assert receiver.recv() == {"READY": "1", "STATUS": "line one line two"}
    assert receiver.drain() == []


def test_reads_os_environ_by_default(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with Notifier.from_env() as n:
        assert n.watchdog_interval == 15.0
        assert n.ready() is True
    assert receiver.recv() == {"READY": "1"}


@pytest.mark.parametrize(
    "environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative.sock"}, {"NOTIFY_SOCKET": "vsock:2:1234"}]
)
async def test_without_a_usable_notify_socket_everything_is_a_no_op(environ: dict[str, str]) -> None:
    env = {**environ, "WATCHDOG_USEC": "200000"}
    with Notifier.from_env(env) as n:
        assert not n.enabled
        assert n.watchdog_interval is None
        assert n.ready() is False
        assert n.reloading() is False
        assert n.stopping() is False
        assert n.status("x") is False
        assert n.watchdog() is False
        await asyncio.wait_for(watchdog_loop(n, lambda: True), timeout=1.0)


def test_send_failure_returns_false_and_never_raises(short_dir: Path) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": str(short_dir / "nobody-listens.sock")}) as n:
        assert n.enabled
        assert n.ready() is False
        assert n.status("still fine") is False


def test_receiver_gone_after_start(receiver: Receiver) -> None:
    with notifier_for(receiver) as n:
        assert n.ready() is True
        receiver.sock.close()
        Path(receiver.address).unlink()
        assert n.watchdog() is False


def test_close_is_idempotent_and_disables(receiver: Receiver) -> None:
    n = notifier_for(receiver, WATCHDOG_USEC="200000")
    n.close()
    n.close()
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog_interval is None
    assert receiver.drain() == []


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(receiver: Receiver, extra: dict[str, str], interval: float | None) -> None:
    with notifier_for(receiver, **extra) as n:
        assert n.watchdog_interval == interval


async def test_watchdog_loop_pings_at_about_half_the_timeout(receiver: Receiver) -> None:
    with notifier_for(receiver, WATCHDOG_USEC="200000") as n:
        task = asyncio.create_task(watchdog_loop(n, lambda: True))
        await asyncio.sleep(0.6)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    messages = receiver.drain()
    assert all(m == {"WATCHDOG": "1"} for m in messages)
    # Nominally 6-7 pings (every 0.1 s); the range only guards against "none" and "busy loop".
    assert 2 <= len(messages) <= 20


async def test_watchdog_loop_is_silent_while_not_alive_and_resumes(receiver: Receiver) -> None:
    alive = False
    checks = 0

    def is_alive() -> bool:
        nonlocal checks
        checks += 1
        return alive

    with notifier_for(receiver, WATCHDOG_USEC="200000") as n:
        task = asyncio.create_task(watchdog_loop(n, is_alive))
        await asyncio.sleep(0.5)
        assert checks >= 2  # it kept checking...
        assert receiver.drain() == []  # ...but sent nothing
        alive = True
        await asyncio.sleep(0.35)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(receiver.drain()) >= 1


async def test_watchdog_loop_returns_when_watchdog_pid_is_another_process(receiver: Receiver) -> None:
    with notifier_for(receiver, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid() + 1)) as n:
        await asyncio.wait_for(watchdog_loop(n, lambda: True), timeout=1.0)
        assert n.ready() is True  # notifications still work; only the watchdog is not ours
    assert receiver.drain() == [{"READY": "1"}]


async def test_watchdog_loop_propagates_a_failing_liveness_check(receiver: Receiver) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    with notifier_for(receiver, WATCHDOG_USEC="200000") as n, pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(watchdog_loop(n, broken), timeout=1.0)
    assert receiver.drain() == []


def test_repr_shows_abstract_address(abstract_receiver: Receiver) -> None:
    with notifier_for(abstract_receiver) as n:
        assert abstract_receiver.address in repr(n)
