"""systemd/batch-poller.service: required directives, `systemd-analyze verify` clean, exposure ≤ 2.0.

The systemd-analyze checks skip on machines without systemd-analyze, except under CI (``CI`` set),
where a missing systemd-analyze is a failure: CI must never silently skip them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from poller.cli import EX_CONFIG
from poller.config import ServiceConfig

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "batch-poller.service"
MAX_EXPOSURE = 2.0
# Units every service depends on implicitly (DefaultDependencies=yes).
IMPLICIT_TARGETS = ("sysinit.target", "basic.target", "shutdown.target")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; comments skipped, continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit_text() -> str:
    return UNIT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def service(unit_text: str) -> dict[str, list[str]]:
    return parse_unit(unit_text)["Service"]


def require_systemd_analyze() -> str:
    """The systemd-analyze binary; skips without it, but fails (not skips) when CI is set at all."""
    found = shutil.which("systemd-analyze")
    if found is None:
        if "CI" in os.environ:
            pytest.fail("systemd-analyze is not installed, and CI must not skip the unit checks: install systemd")
        pytest.skip("systemd-analyze is not installed")
    return found


def run_analyze(analyze: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [analyze, "--no-pager", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


# --- the directives the daemon relies on -----------------------------------------------------------


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}= should be set exactly once, got {values}"
    return values[0]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecStart", "/opt/batch-poller/bin/batch-poller run --config ${CONFIGURATION_DIRECTORY}/config.toml"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("WatchdogSec", "30s"),
        ("Restart", "on-failure"),
        ("RestartSec", "5s"),
        ("RestartPreventExitStatus", "78"),
        ("TimeoutStopSec", "30s"),
        ("DynamicUser", "yes"),
        ("StateDirectory", "batch-poller"),
        ("ConfigurationDirectory", "batch-poller"),
        ("UMask", "0077"),
        ("ProtectSystem", "strict"),
        ("MemoryDenyWriteExecute", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("PrivateUsers", "yes"),
        ("SystemCallArchitectures", "native"),
    ],
)
def test_required_directive(service: dict[str, list[str]], key: str, value: str) -> None:
    assert one(service, key) == value


def test_python_output_is_unbuffered(service: dict[str, list[str]]) -> None:
    assert "PYTHONUNBUFFERED=1" in " ".join(service.get("Environment", [])).split()


def test_credentials_are_loaded_with_a_non_fatal_fallback(service: dict[str, list[str]]) -> None:
    loaded = dict(v.split(":", 1) for v in service.get("LoadCredential", []))
    assert loaded == {name: f"/etc/batch-poller/credentials/{name}" for name in ("openai", "webhook", "mqtt")}
    # A SetCredential= of the same ID makes a missing file non-fatal. Its value must be a placeholder
    # that strips to nothing (the daemon then reports an empty secret file), never a secret.
    fallbacks = dict(v.split(":", 1) for v in service.get("SetCredential", []))
    assert set(fallbacks) == set(loaded)
    assert all(value.replace("\\n", "").strip() == "" for value in fallbacks.values())


def test_network_stays_reachable(service: dict[str, list[str]]) -> None:
    families = " ".join(service.get("RestrictAddressFamilies", [])).split()
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service.get("PrivateNetwork", ["no"])[-1] != "yes"
    denied = " ".join(service.get("IPAddressDeny", [])).split()
    assert "any" not in denied, "outbound HTTPS/MQTT/webhooks go to arbitrary addresses"


def test_syscall_filter_allows_the_service_set(service: dict[str, list[str]]) -> None:
    filters = service.get("SystemCallFilter", [])
    assert "@system-service" in filters
    assert any(f.startswith("~") and "@privileged" in f and "@resources" in f for f in filters)


def test_a_config_error_is_not_restarted(service: dict[str, list[str]]) -> None:
    """The CLI exits EX_CONFIG on any ConfigError; restarting every RestartSec would only repeat it."""
    prevented = " ".join(service.get("RestartPreventExitStatus", [])).split()
    assert str(EX_CONFIG) in prevented
    assert EX_CONFIG == 78
    assert one(service, "Restart") == "on-failure"  # any other failure is still restarted


def test_stop_timeout_outlasts_the_drain_deadline(service: dict[str, list[str]]) -> None:
    stop = float(one(service, "TimeoutStopSec").removesuffix("s"))
    assert stop > float(ServiceConfig().shutdown_timeout) + 5


# --- systemd-analyze ---------------------------------------------------------------------------------


def exec_binaries(service: dict[str, list[str]]) -> set[str]:
    """argv[0] of every Exec*= line, without the special prefixes (- @ : + !)."""
    out: set[str] = set()
    for key, values in service.items():
        if key.startswith("Exec"):
            for value in values:
                out.add(value.split()[0].lstrip("-@:+!|"))
    return out


def scratch_root(tmp_path: Path, unit_text: str, service: dict[str, list[str]], *, stub_binaries: bool = True) -> Path:
    """A file system root holding the unit byte for byte, stub targets, and stub Exec*= binaries.

    `verify` rejects a unit whose ExecStart= is not executable, and /opt/batch-poller exists only where
    the package is installed. Rather than verify an edited copy, verify the real unit text under
    --root, where the only fakes are empty stand-ins for the programs and for the targets the unit
    refers to (so that the result does not depend on the host's own units).
    """
    root = tmp_path / "root"
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / UNIT.name).write_text(unit_text, encoding="utf-8")
    lib_dir = root / "usr/lib/systemd/system"
    lib_dir.mkdir(parents=True)
    targets = set(IMPLICIT_TARGETS) | set(re.findall(r"[\w.@-]+\.target", unit_text))
    for target in targets:
        (lib_dir / target).write_text(f"[Unit]\nDescription=stub {target}\n", encoding="utf-8")
    if stub_binaries:
        for binary in exec_binaries(service):
            assert binary.startswith("/"), f"Exec*= should use absolute paths: {binary}"
            stub = root / binary.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
            stub.chmod(0o755)
    return root


def test_verify_prints_nothing(tmp_path: Path, unit_text: str, service: dict[str, list[str]]) -> None:
    systemd_analyze = require_systemd_analyze()
    root = scratch_root(tmp_path, unit_text, service)
    result = run_analyze(systemd_analyze, "verify", "--man=no", f"--root={root}", UNIT.name)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_harness_does_report_problems(tmp_path: Path, unit_text: str, service: dict[str, list[str]]) -> None:
    """A guard that the check above can fail: the same harness flags a typo and a missing binary."""
    systemd_analyze = require_systemd_analyze()
    broken = unit_text.replace("[Service]\n", "[Service]\nProtectSytem=strict\n", 1)
    root = scratch_root(tmp_path, broken, service, stub_binaries=False)
    result = run_analyze(systemd_analyze, "verify", "--man=no", f"--root={root}", UNIT.name)
    output = result.stdout + result.stderr
    assert "ProtectSytem" in output
    assert "/opt/batch-poller/bin/batch-poller" in output


def test_security_exposure_is_at_most_2() -> None:
    systemd_analyze = require_systemd_analyze()
    result = run_analyze(systemd_analyze, "security", "--offline=true", str(UNIT))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure level in the output of systemd-analyze security:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"
