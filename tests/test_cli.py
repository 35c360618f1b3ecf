"""The `batch-poller` command line: exit codes, options and output, run as real subprocesses (or through
`poller.cli.main` where a subprocess adds nothing), against real simulators and in-process daemons."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from poller.cli import main
from poller.config import DEFAULT_CONFIG_PATH
from poller.runtime.daemon import Daemon
from poller.sim import DEFAULT_KEY, Fault, OpenAISim, serve
from tests.helpers import (
    KEY,
    KEY_ENV,
    cli_env,
    config_dict,
    eventually,
    fast_sim,
    make_config,
    read_jsonl,
    running,
    until,
    write_toml,
)

#: Never set: cli_env() drops every BATCH_POLLER_* variable.
UNSET_SECRET_ENV = "BATCH_POLLER_TEST_UNSET_WEBHOOK_SECRET"
#: An OpenAI-shaped id has 38 characters.
LONG_ID = "batch_" + "0123456789abcdef" * 2
#: EX_CONFIG, which the systemd unit does not restart on.
EXIT_CONFIG = 78


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poller.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=cli_env() if env is None else env,
        cwd=cwd,
        timeout=60,
    )


async def acli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`cli` off the event loop, so simulators and daemons in this loop keep answering."""
    return await asyncio.to_thread(cli, *args, env=env)


def two_sources(urls: dict[str, str], state: Path, sinks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    raw = config_dict("http://placeholder", state, sinks or [])
    del raw["source"]
    raw["sources"] = [
        {"name": name, "provider": "openai", "base_url": url, "api_key_env": KEY_ENV} for name, url in urls.items()
    ]
    return raw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def no_traceback(result: subprocess.CompletedProcess[str]) -> bool:
    return "Traceback" not in result.stdout + result.stderr


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A valid config of one source (nothing listens at its base_url) and a file sink."""
    raw = config_dict("http://127.0.0.1:9/v1", tmp_path / "state.db", [{"kind": "file", "path": str(tmp_path / "e")}])
    return write_toml(tmp_path / "config.toml", raw)


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The source's API key in this process's environment, for `main(argv)` calls."""
    monkeypatch.setenv(KEY_ENV, KEY)


# -- configuration problems exit 78 ---------------------------------------------------------------


def test_run_without_a_config_file_exits_78_saying_where_it_looked(tmp_path):
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this host")
    result = cli("run", cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert no_traceback(result)
    assert "no config file found" in result.stderr
    for place in ("--config", "$BATCH_POLLER_CONFIG", str(DEFAULT_CONFIG_PATH)):
        assert place in result.stderr, place
    assert "fix:" in result.stderr


def unusable_state_paths(tmp_path: Path) -> dict[str, Path]:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    directory = tmp_path / "a-directory"
    directory.mkdir()
    return {
        "parent is a file": blocker / "sub" / "state.db",
        "path is a directory": directory,
        # Not even root may create directories in /proc.
        "directory cannot be created": Path("/proc/self/batch-poller/state.db"),
    }


@pytest.mark.parametrize("case", ["parent is a file", "path is a directory", "directory cannot be created"])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_an_unusable_state_path_exits_78_naming_state_path(tmp_path, command, case):
    raw = config_dict("http://127.0.0.1:9/v1", unusable_state_paths(tmp_path)[case], [])
    result = cli(command, "--config", str(write_toml(tmp_path / "config.toml", raw)))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert no_traceback(result)
    assert "state.path" in result.stderr
    assert "fix:" in result.stderr


@pytest.mark.parametrize("listen", ["127.0.0.1:70000", "127.0.0.1:65536", "127.0.0.1:99999999"])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_listen_port_outside_1_to_65535_exits_78_naming_service_listen(tmp_path, command, listen):
    raw = config_dict("http://127.0.0.1:9/v1", tmp_path / "state.db", [])
    raw["service"] = {"enabled": True, "listen": listen}
    result = cli(command, "--config", str(write_toml(tmp_path / "config.toml", raw)))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert no_traceback(result)
    assert "service.listen" in result.stderr
    assert "65535" in result.stderr
    assert not (tmp_path / "state.db").exists()


@pytest.mark.usefixtures("key_env")
def test_check_config_warns_when_no_sink_is_configured(tmp_path, capsys):
    bare = write_toml(tmp_path / "bare.toml", config_dict("http://127.0.0.1:9/v1", tmp_path / "state.db", []))
    assert main(["check-config", "--config", str(bare)]) == 0
    out, err = capsys.readouterr()
    assert "config OK" in out
    assert "warning: no [[sinks]] configured" in err
    assert "fix:" in err

    sinks = [{"kind": "stdout"}]
    sunk = write_toml(tmp_path / "sunk.toml", config_dict("http://127.0.0.1:9/v1", tmp_path / "state.db", sinks))
    assert main(["check-config", "--config", str(sunk)]) == 0
    out, err = capsys.readouterr()
    assert "config OK" in out
    assert "warning" not in err


# -- check-config --probe -------------------------------------------------------------------------


async def probe(tmp_path: Path, base_url: str, key: str = KEY) -> subprocess.CompletedProcess[str]:
    path = write_toml(tmp_path / "probe.toml", config_dict(base_url, tmp_path / "state.db", [{"kind": "stdout"}]))
    return await acli("check-config", "--probe", "--config", str(path), env=cli_env({KEY_ENV: key}))


async def test_probe_against_a_running_simulator_is_ok(tmp_path):
    sim = fast_sim(speed=0.001)
    sim.create_batches(2)
    async with serve(sim) as url:
        result = await probe(tmp_path, url)
    assert result.returncode == 0, result.stderr
    assert f"source openai: OK, {url}" in result.stdout
    assert "lists 2 batch(es)" in result.stdout
    assert sim.stats.list == 1


@pytest.mark.parametrize("how", ["base_url without /v1", "an HTML 404 page"])
async def test_probe_against_what_is_not_the_api_fails_naming_base_url(tmp_path, how):
    sim = fast_sim(speed=0.001)
    sim.create_batches(1)
    async with serve(sim) as url:
        if how == "an HTML 404 page":
            sim.inject(Fault(kind="html404", count=100))
            base_url = url
        else:
            base_url = url.removesuffix("/v1")
        result = await probe(tmp_path, base_url)
    assert result.returncode == 1, result.stdout
    assert no_traceback(result)
    assert f"source openai: FAILED at {base_url}" in result.stderr
    assert "404" in result.stderr
    assert "fix: check sources.openai.base_url" in result.stderr
    assert "OK" not in result.stdout.replace("config OK", "")


async def test_probe_with_a_wrong_key_fails_naming_the_api_key(tmp_path):
    secret = "sk-wrong-and-never-printed-0123456789"
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        result = await probe(tmp_path, url, key=secret)
    assert result.returncode == 1, result.stdout
    assert no_traceback(result)
    assert "401" in result.stderr
    assert "API key" in result.stderr
    assert f"${KEY_ENV}" in result.stderr
    assert "sources.openai.api_key_env" in result.stderr
    assert secret not in result.stdout + result.stderr
    assert sim.stats.unauthorized == 1


def test_check_config_json_reports_sources_sinks_and_state(config, tmp_path):
    result = cli("check-config", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    report = json.loads(line)
    assert report == {
        "ok": True,
        "sources": {"openai": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "sinks": {"file": {"kind": "file"}},
        "state": str(tmp_path / "state.db"),
        "warnings": [],
    }


async def test_check_config_json_probe_says_which_source_failed_and_the_fix(tmp_path):
    secret = "sk-wrong-and-never-printed-0123456789"
    good, bad = fast_sim(speed=0.001), fast_sim(speed=0.001)
    good.create_batches(2)
    async with serve(good) as good_url, serve(bad) as bad_url:
        raw = config_dict(good_url, tmp_path / "state.db", [])
        del raw["source"]
        raw["sources"] = [
            {"name": "good", "provider": "openai", "base_url": good_url, "api_key_env": KEY_ENV},
            {"name": "bad", "provider": "openai", "base_url": bad_url, "api_key_env": "BATCH_POLLER_TEST_BAD_KEY"},
        ]
        path = write_toml(tmp_path / "two.toml", raw)
        result = await acli(
            "check-config",
            "--probe",
            "--json",
            "--config",
            str(path),
            env=cli_env({"BATCH_POLLER_TEST_BAD_KEY": secret}),
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["sinks"] == {}
    assert report["warnings"] == ["no [[sinks]] configured: events are recorded but published nowhere"]
    assert report["probe"]["good"] == {
        "ok": True,
        "base_url": good_url,
        "detail": "answers and lists 2 batch(es) on its first page",
        "fix": None,
    }
    failed = report["probe"]["bad"]
    assert failed["ok"] is False
    assert "401" in failed["detail"]
    assert "sources.bad.api_key_env" in failed["fix"]
    assert secret not in result.stdout


async def test_show_json_prints_each_recorded_event_whole(tmp_path):
    sim = fast_sim(speed=0.001)
    [batch_id] = sim.create_batches(1)
    events = tmp_path / "events.jsonl"
    async with serve(sim) as url:
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(events)}])
        raw["source"]["track"] = [batch_id]
        async with running(make_config(raw)):
            await eventually(lambda: bool(read_jsonl(events)))
    path = write_toml(tmp_path / "show.toml", raw)
    result = await acli("show", batch_id, "--json", "--config", str(path))
    assert result.returncode == 0, result.stderr
    shown = [json.loads(line) for line in result.stdout.splitlines()]
    assert shown == read_jsonl(events)
    assert [e["type"] for e in shown] == ["batch.validating"]
    assert shown[0]["data"]["id"] == batch_id


# -- secrets: only what a command uses ------------------------------------------------------------


async def test_commands_need_only_the_secrets_they_use(tmp_path):
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        [batch_id] = sim.create_batches(1)
        webhook = {"kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret_env": UNSET_SECRET_ENV}
        path = str(write_toml(tmp_path / "config.toml", config_dict(url, tmp_path / "state.db", [webhook])))
        # Commands that start the daemon or check the config need every secret: they fail, naming it.
        for command in ("check-config", "run"):
            refused = await acli(command, "--config", path)
            assert refused.returncode == EXIT_CONFIG, refused.stderr
            assert "secret" in refused.stderr
            assert UNSET_SECRET_ENV in refused.stderr

        # Cancel needs the API key and nothing else.
        cancelled = await acli("cancel", batch_id, "--config", path)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.strip() == f"{batch_id}: cancelling"
        assert sim.get(batch_id)["status"] == "cancelling"

        # The store commands need no secret at all, not even the API key.
        keyless = {k: v for k, v in cli_env().items() if k != KEY_ENV}
        runs = [
            ("track", batch_id),
            ("list",),
            ("show", batch_id),
            ("deliveries",),
            ("status",),
            ("untrack", batch_id),
        ]
        for args in runs:
            result = await acli(*args, "--config", path, env=keyless)
            assert result.returncode != EXIT_CONFIG, (args, result.stderr)
            assert no_traceback(result), (args, result.stderr)
            expected = 3 if args[0] == "status" else 0  # status: no daemon answers
            assert result.returncode == expected, (args, result.stdout, result.stderr)


# -- options --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("key_env")
def test_config_is_accepted_before_the_subcommand(config, capsys):
    assert main(["--config", str(config), "track", LONG_ID]) == 0
    assert capsys.readouterr().out == f"{LONG_ID}: tracking\n"
    assert main(["--config", str(config), "list", "--json"]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [LONG_ID]
    assert main(["--config", str(config), "check-config"]) == 0
    assert "config OK" in capsys.readouterr().out
    # After the subcommand, as before.
    assert main(["untrack", LONG_ID, "--config", str(config)]) == 0
    assert capsys.readouterr().out == f"{LONG_ID}: untracked\n"
    # And before it as a real subprocess, where argv parsing is the whole story.
    result = cli("--config", str(config), "deliveries")
    assert (result.returncode, result.stdout) == (0, "no pending or dead deliveries\n")


def test_list_columns_fit_38_character_ids(config, capsys):
    ids = [LONG_ID, "batch_a", LONG_ID.replace("0", "z")]
    assert main(["track", *ids, "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["list", "--config", str(config)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.startswith("ID ")
    assert len(rows) == len(ids)
    columns = ["SOURCE", "STATUS", "PROGRESS", "TRACKED"]
    starts = [header.index(name) for name in columns]
    assert starts[0] >= len(LONG_ID) + 2
    for row in rows:
        batch_id = row[: starts[0]].rstrip()
        assert batch_id in ids, row  # whole, never cut
        assert row[starts[0] :].startswith("openai "), row
        assert row[starts[1] :].startswith("(pending) "), row
        assert row[starts[1] - 2 : starts[1]] == "  ", row
        assert row[starts[2] - 2 : starts[2]] == "  ", row
        assert row[starts[3] :] == "cli", row


# -- status ---------------------------------------------------------------------------------------


@asynccontextmanager
async def daemon_with_service(tmp_path: Path, sim: OpenAISim) -> AsyncIterator[tuple[Daemon, Path]]:
    """An in-process daemon serving its control API on a free port, and a config file pointing at it."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(serve(sim))
        raw = config_dict(url, tmp_path / "state.db", [{"kind": "file", "path": str(tmp_path / "events.jsonl")}])
        raw["source"]["track"] = sim.create_batches(1)
        raw["service"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}
        path = write_toml(tmp_path / "config.toml", raw)
        daemon = await stack.enter_async_context(running(make_config(raw)))
        yield daemon, path


async def test_status_exit_codes_tell_no_daemon_ready_and_not_ready(tmp_path):
    # No daemon answers: 3, from the store (the service is configured, nothing listens).
    raw = config_dict("http://127.0.0.1:9/v1", tmp_path / "state.db", [])
    raw["service"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}
    lonely = write_toml(tmp_path / "lonely.toml", raw)
    result = await acli("status", "--config", str(lonely))
    assert (result.returncode, result.stderr) == (3, "")
    assert "daemon:  not answering" in result.stdout

    # A daemon that polls successfully: 0.
    ready_dir = tmp_path / "ready"
    ready_dir.mkdir()
    async with daemon_with_service(ready_dir, fast_sim(speed=0.001)) as (daemon, path):
        await eventually(lambda: daemon.readiness()[0])
        result = await acli("status", "--config", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ready:   yes" in result.stdout
        as_json = await acli("status", "--json", "--config", str(path))
        assert as_json.returncode == 0
        assert json.loads(as_json.stdout)["ready"] is True

    # A daemon whose API rejects the key: running, not ready: 1, with the reason.
    rejected_dir = tmp_path / "rejected"
    rejected_dir.mkdir()
    async with daemon_with_service(rejected_dir, fast_sim(speed=0.001, api_keys=("other",))) as (daemon, path):
        await eventually(lambda: not daemon.readiness()[0] and daemon.runner(None).health.auth_failing)
        result = await acli("status", "--config", str(path))
        assert result.returncode == 1, result.stdout + result.stderr
        assert "daemon:  running" in result.stdout
        assert "ready:   NO: " in result.stdout
        assert "rejects the credentials" in result.stdout


def test_status_json_into_a_pipe_closed_early_prints_no_traceback(config):
    whole = cli("status", "--json", "--config", str(config))
    assert whole.returncode == 3
    assert json.loads(whole.stdout)["daemon"] == "not answering"

    # `status --json | head -c 10`, a real pipeline.
    cmd = [sys.executable, "-m", "poller.cli", "status", "--json", "--config", str(config)]
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    assert writer.stdout is not None
    assert writer.stderr is not None
    head = subprocess.run(["head", "-c", "10"], stdin=writer.stdout, capture_output=True, timeout=60, check=True)
    writer.stdout.close()
    err = writer.stderr.read().decode()
    writer.stderr.close()
    assert writer.wait(timeout=60) in (3, 141)  # 141 when head left before the write
    assert head.stdout.decode() == whole.stdout[:10]
    assert err == ""

    # A reader that left before anything was written: the write fails, quietly.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        gone = subprocess.run(
            cmd, stdout=write_end, capture_output=False, stderr=subprocess.PIPE, env=cli_env(), timeout=60, check=False
        )
    finally:
        os.close(write_end)
    assert gone.returncode == 141
    assert gone.stderr.decode() == ""


# -- deliveries -----------------------------------------------------------------------------------


async def test_deliveries_json_lines_and_an_unknown_sink_is_an_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    sinks = [
        {"kind": "file", "name": "broken", "path": str(blocker / "events.jsonl")},
        {"kind": "file", "name": "good", "path": str(tmp_path / "events.jsonl")},
    ]
    sim = fast_sim(speed=0.001)
    async with serve(sim) as url:
        ids = sim.create_batches(2)
        raw = config_dict(url, tmp_path / "state.db", sinks)
        raw["source"]["track"] = ids
        path = str(write_toml(tmp_path / "config.toml", raw))
        async with running(make_config(raw)) as daemon:

            async def all_pending() -> bool:
                return len(await daemon.store.deliveries("broken")) == len(ids)

            await until(all_pending)

            result = await acli("deliveries", "--json", "--config", path)
            assert result.returncode == 0, result.stderr
            records = [json.loads(line) for line in result.stdout.splitlines()]
            assert {r["batch_id"] for r in records} == set(ids)
            for record in records:
                assert set(record) == {
                    "sink", "state", "event_id", "batch_id", "type", "sequence", "attempts", "last_error",
                }  # fmt: skip
                assert (record["sink"], record["state"], record["type"]) == ("broken", "pending", "batch.validating")
            only = await acli("deliveries", "--sink", "broken", "--json", "--config", path)
            assert {json.loads(line)["event_id"] for line in only.stdout.splitlines()} == {
                r["event_id"] for r in records
            }
            none = await acli("deliveries", "--sink", "good", "--json", "--config", path)
            assert (none.returncode, none.stdout) == (0, "")

            # The table fits 38-character ids: every row's columns start under their headers.
            table = await acli("deliveries", "--config", path)
            header, *rows = table.stdout.splitlines()
            assert len(rows) == len(ids)
            event_col = header.index("EVENT")
            for row in rows:
                assert row.split()[2] in ids
                assert row[event_col:].startswith("batch.validating"), (header, row)

            unknown = await acli("deliveries", "--sink", "nope", "--config", path)
            assert unknown.returncode == EXIT_CONFIG
            assert "--sink" in unknown.stderr
            assert "'nope'" in unknown.stderr
            assert "broken, good" in unknown.stderr


# -- sources --------------------------------------------------------------------------------------


async def test_source_is_required_with_two_sources_and_honoured_when_given(tmp_path):
    sims = {"alpha": fast_sim(speed=0.001, seed=71), "beta": fast_sim(speed=0.001, seed=72)}
    async with serve(sims["alpha"]) as alpha_url, serve(sims["beta"]) as beta_url:
        [beta_id] = sims["beta"].create_batches(1)
        raw = two_sources({"alpha": alpha_url, "beta": beta_url}, tmp_path / "state.db")
        path = str(write_toml(tmp_path / "config.toml", raw))

        for args in (("track", beta_id), ("untrack", beta_id), ("cancel", beta_id)):
            refused = await acli(*args, "--config", path)
            assert refused.returncode == EXIT_CONFIG, (args, refused.stderr)
            assert "--source" in refused.stderr
            assert "more than one source" in refused.stderr
            assert "alpha, beta" in refused.stderr
        unknown = await acli("track", beta_id, "--source", "gamma", "--config", path)
        assert unknown.returncode == EXIT_CONFIG
        assert "'gamma'" in unknown.stderr
        assert "alpha, beta" in unknown.stderr

        tracked = await acli("track", beta_id, "--source", "beta", "--config", path)
        assert (tracked.returncode, tracked.stdout) == (0, f"{beta_id}: tracking\n")
        listing = await acli("list", "--json", "--source", "beta", "--config", path)
        assert [(r["source"], r["id"]) for r in map(json.loads, listing.stdout.splitlines())] == [("beta", beta_id)]
        listing = await acli("list", "--json", "--source", "alpha", "--config", path)
        assert listing.stdout == ""
        every = await acli("list", "--config", path)  # without --source: every source
        assert beta_id in every.stdout
        assert " beta " in every.stdout
        shown = await acli("show", beta_id, "--source", "alpha", "--config", path)
        assert shown.returncode == 1
        assert "not tracked" in shown.stderr

        cancelled = await acli("cancel", beta_id, "--source", "beta", "--config", path)
        assert (cancelled.returncode, cancelled.stdout) == (0, f"{beta_id}: cancelling\n"), cancelled.stderr
        assert sims["beta"].get(beta_id)["status"] == "cancelling"
        assert sims["alpha"].stats.cancel == 0

        wrong = await acli("untrack", beta_id, "--source", "alpha", "--config", path)
        assert (wrong.returncode, wrong.stdout) == (1, f"{beta_id}: was not tracked\n")
        right = await acli("untrack", beta_id, "--source", "beta", "--config", path)
        assert (right.returncode, right.stdout) == (0, f"{beta_id}: untracked\n")


# -- simulate -------------------------------------------------------------------------------------


async def test_simulate_on_port_0_prints_its_url_and_serves_there():
    script = Path(sys.executable).with_name("batch-poller")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "poller.cli"]
    proc = await asyncio.create_subprocess_exec(
        *command,
        "simulate",
        "--port",
        "0",
        "--batches",
        "3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("openai batch API simulator at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].split()[0]
        assert url.endswith("/v1")
        assert int(url.rsplit(":", 1)[1].split("/")[0]) > 0
        assert DEFAULT_KEY in line
        headers = {"Authorization": f"Bearer {DEFAULT_KEY}"}
        async with aiohttp.ClientSession() as http, http.get(f"{url}/batches", headers=headers) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert len(body["data"]) == 3
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        code = await asyncio.wait_for(proc.wait(), 20)
    assert code == 0
    assert proc.stderr is not None
    assert b"Traceback" not in await proc.stderr.read()
