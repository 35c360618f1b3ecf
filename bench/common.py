"""Shared pieces of the benchmarks: result rows, child processes, the simulator and broker processes, configs."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

KEY_ENV = "BENCH_BATCH_API_KEY"
KEY = "sk-sim"
#: The one source every benchmark's daemon polls (`[[sources]] name`).
SOURCE = "openai"
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@dataclass
class Row:
    """One line of the results table."""

    figure: str
    poller: str
    alternative: str
    ratio: str
    target: str
    #: True/False when the row has a target, None when it is informational.
    met: bool | None = None


@dataclass
class Section:
    """What one benchmark reports: table rows and notes for RESULTS.md."""

    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


# -- numbers -----------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def fmt(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(a: float, b: float, digits: int = 2) -> str:
    return "n/a" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.{digits}f}"


def quick(ctx: dict[str, Any]) -> bool:
    """Whether this is a `--quick` run: smallest sizes, one repetition, to prove a benchmark runs."""
    return bool(ctx.get("quick"))


# -- processes ---------------------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: no BATCH_POLLER_* overrides, no systemd variables, the bench key."""
    drop = ("BATCH_POLLER_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({KEY_ENV: KEY, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    return env | (extra or {})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_json_child(module: str, *args: str, timeout: float = 600.0) -> dict[str, Any]:
    """Run `python -m module args` and return the JSON object on its last stdout line."""
    proc = subprocess.run(
        [PYTHON, "-m", module, *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a running process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a child's log, for an error message (the work directory is removed afterwards)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary directory, removed afterwards unless BENCH_KEEP is set (for looking at daemon logs)."""
    if os.environ.get("BENCH_KEEP"):
        kept = Path(tempfile.mkdtemp(prefix=f"batch-poller-bench-{prefix}-"))
        print(f"[bench] keeping {kept}", file=sys.stderr)
        yield kept
        return
    with tempfile.TemporaryDirectory(prefix=f"batch-poller-bench-{prefix}-") as d:
        yield Path(d)


# -- the simulator in its own process ------------------------------------------------------------------


@dataclass
class SimProcess:
    """A `bench.simproc` child serving the simulated Batch API; `ids` are its batches, newest last."""

    proc: subprocess.Popen[bytes]
    url: str
    ids: list[str]

    @property
    def admin(self) -> str:
        return self.url.rsplit("/v1", 1)[0] + "/_sim"


@contextlib.contextmanager
def ready_child(module: str, args: Sequence[str], log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start `python -m module args`, wait for its ``READY <url>`` line; yield (process, url); stop on exit."""
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [PYTHON, "-m", module, *args], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=log
    )
    log.close()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"{module} did not start (exit {proc.poll()}): {line!r}; see {log_path}")
        yield proc, line.split()[1]
    finally:
        stop_process(proc)


@contextlib.contextmanager
def sim_process(
    batches: int, tmp: Path, *, seed: int = 1, phase: str = "in_progress", extra: Sequence[str] = ()
) -> Iterator[SimProcess]:
    """Start `python -m bench.simproc` with `batches` batches steady in `phase` (`extra`: more of its
    arguments); stopped on exit."""
    ids_file = tmp / f"sim-ids-{batches}.json"
    args = ["--batches", str(batches), "--seed", str(seed), "--ids-out", str(ids_file), "--phase", phase, *extra]
    with ready_child("bench.simproc", args, tmp / "simulator.log") as (proc, url):
        yield SimProcess(proc, url, json.loads(ids_file.read_text()))


# -- Mosquitto ---------------------------------------------------------------------------------------


def find_mosquitto() -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"])
    found = os.environ.get("MOSQUITTO") or shutil.which("mosquitto", path=search)
    if not found:
        raise RuntimeError("mosquitto not found: apt-get install mosquitto, or run `make bench` which installs it")
    return found


class Mosquitto:
    """A private anonymous broker on a free loopback port (the tests' approach, without pytest).

    `nodelay`: the broker sets TCP_NODELAY on its client sockets (mosquitto's `set_tcp_nodelay`, off by
    default), so its acknowledgements are not held back by Nagle's algorithm."""

    def __init__(self, directory: Path, *, nodelay: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "persistence false",
                    f"set_tcp_nodelay {'true' if nodelay else 'false'}",
                    f"user {getpass.getuser()}",
                    "allow_anonymous true",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                ]
            )
            + "\n"
        )

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        with (self.directory / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen([find_mosquitto(), "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not listen on {self.port}") from None
                time.sleep(0.02)
            else:
                return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
            self.proc = None


# -- configs -----------------------------------------------------------------------------------------


#: `[poll]` intervals of an hour: no batch comes due by itself while a figure is measured.
QUIET = dict.fromkeys(("validating", "in_progress", "finalizing", "cancelling", "max_interval"), "1h")


def poller_config(
    base_url: str,
    state: Path,
    sinks: list[dict[str, Any]] | None = None,
    *,
    service_port: int | None = None,
    log_level: str = "info",
    **poll: Any,
) -> dict[str, Any]:
    """A config dict (TOML-shaped) for a daemon with one OpenAI source, the simulator; `poll` overrides [poll] keys.

    The source is the single `[source]` table (`tests.helpers.write_toml` writes only `[[sinks]]` as an
    array of tables); it is read as the one `[[sources]]` entry named `SOURCE`.
    """
    return {
        "source": {"name": SOURCE, "provider": "openai", "base_url": base_url, "api_key_env": KEY_ENV},
        "poll": {"max_requests_per_second": 100_000, "max_concurrency": 8} | poll,
        "state": {"path": str(state)},
        "log": {"level": log_level, "format": "json"},
        "service": {"enabled": service_port is not None, "listen": f"127.0.0.1:{service_port or 9464}"},
        "sinks": sinks or [],
    }


def devnull_logging(level: str = "info") -> None:
    """Configure the daemon's logging as in production (JSON lines) but into /dev/null."""
    from poller.logs import configure  # noqa: PLC0415

    configure(level, "json", stream=open(os.devnull, "w"))  # noqa: SIM115, PTH123 - lives as long as the process


# -- the machine -------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """Cores, CPU model, memory, OS, Python and library versions, for RESULTS.md."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    libs = []
    for name in ("aiohttp", "aiomqtt", "pydantic", "openai"):
        try:
            libs.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            libs.append(f"{name} (not installed)")
    mosquitto = "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=5, check=False).stdout
        mosquitto = out.splitlines()[0].removeprefix("mosquitto version ").strip()
    commit = "unknown"
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return {
        "CPU": cpu,
        "Cores": str(os.cpu_count()),
        "Memory": mem,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "Libraries": ", ".join(libs) + f", mosquitto {mosquitto}",
        "Commit": commit,
        "Date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# -- asyncio helpers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def timeout_guard(seconds: float, what: str) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise RuntimeError(f"{what} did not finish within {seconds:g}s") from None


async def until(condition: Callable[[], bool], *, within: float = math.inf, every: float = 0.02) -> bool:
    """Poll `condition` (state another task changes) until it holds; False if `within` seconds passed first."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)
    return True
