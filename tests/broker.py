"""A real Mosquitto per test, on a free loopback port, plus TLS material made with the openssl CLI.

Loaded as a pytest plugin by tests/conftest.py. Without the `mosquitto` binary the tests FAIL (never
skip): an MQTT sink that was never run against a broker is not tested.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"])
_INSTALL_HINT = "apt-get install mosquitto, or run `make test` which installs it"


def find_tool(name: str) -> str:
    """The path of a Mosquitto/OpenSSL tool (``$MOSQUITTO`` overrides the broker); fails the test if absent."""
    override = os.environ.get(name.upper()) if name == "mosquitto" else None
    found = override or shutil.which(name, path=_SEARCH_PATH)
    if not found:
        hint = _INSTALL_HINT if name.startswith("mosquitto") else f"install {name}"
        pytest.fail(f"{name} not found: {hint}", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, a server certificate it signed, a client certificate, and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    wrong_name_cert: Path
    wrong_name_key: Path


class Mosquitto:
    """One broker process with its own config, log and port; restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str,
        port: int | None = None,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        require_certificate: bool = False,
        persistence: bool = False,
    ) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = port or free_port()
        self.tls = tls
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} 127.0.0.1",
            # With persistence, retained messages and persistent sessions survive a stop/start (saved on SIGTERM).
            *(["persistence true", f"persistence_location {workdir}/"] if persistence else ["persistence false"]),
            f"user {getpass.getuser()}",  # as root, stay root instead of dropping to `mosquitto`
            "log_dest stderr",
            "log_type all",
        ]
        if users:
            passwd = workdir / "passwd"
            for i, (user, password) in enumerate(users.items()):
                flags = ["-b", "-c"] if i == 0 else ["-b"]
                subprocess.run([find_tool("mosquitto_passwd"), *flags, str(passwd), user, password], check=True)
            passwd.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
            if require_certificate:
                lines.append("require_certificate true")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until the port accepts connections."""
        assert not self.running, "already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {self.proc.returncode}:\n{self.log_text()}", pytrace=False)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mosquitto did not listen on {self.port}:\n{self.log_text()}", pytrace=False)
                time.sleep(0.02)
            else:
                return

    def stop(self) -> None:
        """SIGTERM and wait: clients see the connection close."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case a test paused it
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """SIGKILL: the kernel closes every connection at once, nothing is flushed."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is acknowledged."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


MosquittoFactory = Callable[..., Mosquitto]


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    return find_tool("mosquitto")


@pytest.fixture
def mosquitto_factory(mosquitto_bin: str, tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Makes brokers (not started unless ``start=True``); every one is stopped at teardown."""
    made: list[Mosquitto] = []

    def make(
        *,
        start: bool = True,
        port: int | None = None,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        require_certificate: bool = False,
        persistence: bool = False,
    ) -> Mosquitto:
        broker = Mosquitto(
            tmp_path / f"mosquitto-{len(made)}",
            binary=mosquitto_bin,
            port=port,
            users=users,
            tls=tls,
            require_certificate=require_certificate,
            persistence=persistence,
        )
        made.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> Mosquitto:
    """A started anonymous broker on a free port."""
    return mosquitto_factory()


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run([find_tool("openssl"), *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", crt, "-days", "2", "-subj", f"/CN=batch-poller test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=d,
    )  # fmt: skip
    return crt, key


def _make_leaf(d: Path, name: str, ca: tuple[Path, Path], *, usage: str, san: str) -> tuple[Path, Path]:
    key, csr, crt, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n" + (f"subjectAltName={san}\n" if san else "")
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", crt, "-days", "2", "-extfile", ext,
        cwd=d,
    )  # fmt: skip
    key.chmod(0o600)
    return crt, key


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    d = tmp_path_factory.mktemp("tls")
    ca = _make_ca(d, "ca")
    other_ca = _make_ca(d, "other-ca")
    server = _make_leaf(d, "server", ca, usage="serverAuth", san="DNS:localhost,IP:127.0.0.1")
    wrong = _make_leaf(d, "wrong-name", ca, usage="serverAuth", san="DNS:elsewhere.invalid")
    client = _make_leaf(d, "client", ca, usage="clientAuth", san="")
    return TlsFiles(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        other_ca=other_ca[0],
        wrong_name_cert=wrong[0],
        wrong_name_key=wrong[1],
    )
