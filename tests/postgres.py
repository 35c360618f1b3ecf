"""A private PostgreSQL cluster for the tests: initdb and pg_ctl from Debian's `postgresql` package, in a
temporary directory, on a free port, its unix socket in that directory too. Never a server that
happens to run on the machine.

initdb refuses to run as root, so as root (CI, this sandbox) the cluster belongs to the `postgres` user
the package creates, and every command runs through `runuser`. A plugin of tests/conftest.py: tests ask
for `postgres_cluster` (session scope) or `postgres_database` (a fresh, empty database per test).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

_databases = count(1)


def _binaries() -> Path:
    """The newest installed PostgreSQL's bin directory (`make system-deps` installs the package)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        pytest.fail("PostgreSQL is not installed: run `make system-deps` (Debian: apt-get install postgresql)")
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The role the store connects as over TCP, with a password (scram-sha-256), as in production.
ROLE, PASSWORD = "poller", "test-only-password"


@dataclass(frozen=True)
class Cluster:
    root: Path
    port: int
    user: str

    def url(self, database: str = "postgres") -> str:
        """The store's URL (no password in it: that comes from `PASSWORD`, as password_env would give it)."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str) -> str:
        return make_conninfo(self.url(database), password=PASSWORD)

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """The superuser, over the cluster's own unix socket (trusted there only)."""
        return psycopg.connect(
            host=str(self.root), port=self.port, user=self.user, dbname="postgres", autocommit=True, connect_timeout=10
        )


def _runner() -> tuple[list[str], str]:
    """The command prefix that runs PostgreSQL's tools, and the OS user they run as."""
    if os.geteuid() != 0:
        return [], pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root needs the `postgres` user (Debian's postgresql package creates it)")
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", "postgres", "--"], "postgres"


def _run(prefix: list[str], *args: str) -> None:
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, check=False, timeout=120)
    if done.returncode:
        pytest.fail(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}")


@contextlib.contextmanager
def private_cluster() -> Iterator[Cluster]:
    """Start a private cluster (stopped and removed on exit); also what `make bench` uses."""
    bin_dir = _binaries()
    prefix, user = _runner()
    root = Path(tempfile.mkdtemp(prefix="poller-pg-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data, port = root / "data", _free_port()
    _run(
        prefix,
        str(bin_dir / "initdb"),
        "-D",
        str(data),
        "-U",
        user,
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "-E",
        "UTF8",
        "--no-sync",
    )
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
        " -c full_page_writes=off -c max_connections=200"
    )
    _run(prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
    try:
        cluster = Cluster(root, port, user)
        with cluster.admin() as admin:
            admin.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'".encode())
        yield cluster
    finally:
        subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            check=False,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    with private_cluster() as cluster:
        yield cluster


def create_database(cluster: Cluster) -> str:
    """A new, empty database owned by `ROLE`; returns its name."""
    name = f"test_{os.getpid()}_{next(_databases)}"
    with cluster.admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" OWNER {ROLE}'.encode())
    return name


@pytest.fixture
def postgres_database(postgres_cluster: Cluster) -> Iterator[str]:
    """The name of a new, empty database owned by `ROLE`, dropped after the test."""
    name = create_database(postgres_cluster)
    try:
        yield name
    finally:
        with postgres_cluster.admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
