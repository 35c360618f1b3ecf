"""What only the PostgreSQL store does: its `[state]` config and password, its schema migrations, and
sharing one database between replicas (claims on outbox heads, compare-and-set under real concurrency).
The behaviour it shares with SQLite is in tests/test_store_contract.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from poller.config import parse_config
from poller.domain.transitions import Knowledge
from poller.errors import ConfigError
from poller.sim import serve
from poller.store import open_store
from poller.store.base import Write
from poller.store.codec import dump_body, fingerprint
from poller.store.postgres import PostgresStore, _schema
from poller.store.postgres._schema import SCHEMA_VERSION
from poller.store.postgres.outbox import CLAIM_TTL
from poller.store.sqlite import SqliteStore
from tests.helpers import FINAL, check_event_log, config_dict, eventually, fast_sim, make_config, read_jsonl, running
from tests.postgres import PASSWORD, Cluster
from tests.test_daemon import settled, until
from tests.test_store_contract import NOW, SRC, event, row

ENV = "POLLER_TEST_PG_PASSWORD"


def state_config(**state: Any) -> Any:
    return parse_config({"state": state}).state


def config_error(**state: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config({"state": state})
    return info.value


def test_a_url_with_a_password_is_refused_without_showing_it() -> None:
    error = config_error(url="postgresql://poller:hunter2@db.example/poller")
    assert error.key == "state.url"
    assert "password_env" in error.problem
    assert "hunter2" not in error.render()
    assert config_error(url="postgresql://poller@db/poller?password=hunter2").key == "state.url"


@pytest.mark.parametrize(
    ("state", "key", "words"),
    [
        pytest.param({"url": "mysql://db/poller"}, "state.url", "PostgreSQL URL", id="not-postgres"),
        pytest.param({"url": "postgresql://db/p", "path": "/tmp/x.db"}, "state", "only one of path", id="both"),
        pytest.param({"password_env": "X"}, "state", "go with url", id="password-without-url"),
        pytest.param(
            {"url": "postgresql://db/p", "password_env": "X", "password_file": "/x"}, "state", "only one", id="two"
        ),
    ],
)
def test_state_config_errors(state: dict[str, Any], key: str, words: str) -> None:
    error = config_error(**state)
    assert error.key == key
    assert words in error.problem


def test_open_store_picks_the_engine(tmp_path: Path) -> None:
    assert isinstance(open_store(state_config(path=str(tmp_path / "s.db")), {}), SqliteStore)
    store = open_store(state_config(url="postgresql://poller@db.example/poller", password_env=ENV), {ENV: "pw"})
    assert isinstance(store, PostgresStore)
    assert store.description == "postgresql://poller@db.example/poller"
    assert "pw" in store.conninfo  # handed to libpq, never shown
    with pytest.raises(ConfigError) as info:
        open_store(state_config(url="postgresql://poller@db.example/poller", password_env=ENV), {})
    assert info.value.key == "state.password_env"


async def test_the_password_comes_from_password_env_or_file(
    postgres_cluster: Cluster, postgres_database: str, tmp_path: Path
) -> None:
    url = postgres_cluster.url(postgres_database)
    secret = tmp_path / "pg-password"
    secret.write_text(PASSWORD + "\n")
    for config, environ in [
        (state_config(url=url, password_env=ENV), {ENV: PASSWORD}),
        (state_config(url=url, password_file=str(secret)), {}),
    ]:
        async with open_store(config, environ) as store:
            assert await store.track(SRC, ["a"], "cli", NOW) in (["a"], [])
    with pytest.raises(ConfigError) as info:
        async with open_store(state_config(url=url, password_env=ENV), {ENV: "wrong"}):
            pass
    assert info.value.key == "state.url"
    assert "wrong" not in info.value.render()


async def test_the_schema_is_created_once_and_a_newer_one_is_refused(
    postgres_cluster: Cluster, postgres_database: str
) -> None:
    conninfo, url = postgres_cluster.conninfo(postgres_database), postgres_cluster.url(postgres_database)
    stores = [PostgresStore(conninfo, url, name=f"r{i}") for i in range(3)]
    await asyncio.gather(*(s.__aenter__() for s in stores))  # replicas starting together
    for s in stores:
        await s.__aexit__(None, None, None)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert [v for (v,) in versions] == list(range(1, SCHEMA_VERSION + 1))
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError) as info:
        async with PostgresStore(conninfo, url):
            pass
    assert info.value.key == "state.url"
    assert "newer" in info.value.fix or "version" in info.value.problem


async def test_version_3_backfills_the_fingerprint_of_every_stored_body(
    postgres_cluster: Cluster, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conninfo, url = postgres_cluster.conninfo(postgres_database), postgres_cluster.url(postgres_database)
    bodies = {f"b{i}": dump_body({"id": f"b{i}", "status": "in_progress", "n": i}) for i in range(2_500)}
    everything = _schema.migrations()
    monkeypatch.setattr(_schema, "migrations", lambda: [m for m in everything if m[0] <= 2])
    async with PostgresStore(conninfo, url):  # a database the previous release made
        pass
    with psycopg.connect(conninfo, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO batches (source, id, origin, added_at, snapshot) VALUES (%s, %s, 'cli', 0, %s)",
                [(SRC, batch_id, body) for batch_id, body in bodies.items()],
            )
        conn.execute("INSERT INTO batches (source, id, origin, added_at) VALUES (%s, 'never-seen', 'cli', 1)", (SRC,))
    monkeypatch.setattr(_schema, "migrations", lambda: everything)
    async with PostgresStore(conninfo, url) as store:
        loaded = {b.id: b.fingerprint for b in await store.batches(SRC)}
    assert loaded == {**{i: fingerprint(body) for i, body in bodies.items()}, "never-seen": None}


async def test_a_head_claimed_by_one_replica_waits_for_its_claim(
    postgres_cluster: Cluster, postgres_database: str
) -> None:
    conninfo, url = postgres_cluster.conninfo(postgres_database), postgres_cluster.url(postgres_database)
    async with PostgresStore(conninfo, url, name="one") as one, PostgresStore(conninfo, url, name="two") as two:
        await one.track(SRC, ["a", "b"], "cli", NOW)
        for batch_id in ("a", "b"):
            await one.record([Write(await row(one, batch_id), [event(batch_id, 1), event(batch_id, 2)])], NOW)

        [first] = await one.claim_heads("mqtt", NOW, set(), 1)
        assert (first.batch_id, first.sequence) == ("a", 1)
        # The other replica gets the other batch, never a second row of the claimed one.
        assert [(r.batch_id, r.sequence) for r in await two.claim_heads("mqtt", NOW, set(), 10)] == [("b", 1)]
        again = await two.claim_heads("mqtt", NOW, set(), 10)  # asked again: its own claim, not the other's
        assert [(r.batch_id, r.sequence) for r in again] == [("b", 1)]
        assert await two.next_ready_at("mqtt", {(SRC, "b")}) == NOW + CLAIM_TTL
        assert [r.event_id for r in await one.claim_heads("mqtt", NOW, set(), 10)] == ["evt_a_1"]

        # Acknowledged: the batch's next row is a head again, for whichever replica is free.
        await one.mark_delivered("mqtt", ["evt_a_1"], NOW + 1)
        assert [r.event_id for r in await two.claim_heads("mqtt", NOW + 1, {(SRC, "b")}, 10)] == ["evt_a_2"]

        # A replica that dies holding a claim loses it once the claim runs out.
        later = NOW + 2 + CLAIM_TTL
        assert {r.event_id for r in await one.claim_heads("mqtt", later, set(), 10)} == {"evt_a_2", "evt_b_1"}


async def test_concurrent_writers_record_a_transition_once(postgres_cluster: Cluster, postgres_database: str) -> None:
    conninfo, url = postgres_cluster.conninfo(postgres_database), postgres_cluster.url(postgres_database)
    stores = [PostgresStore(conninfo, url, name=f"r{i}") for i in range(4)]
    for s in stores:
        await s.__aenter__()
    try:
        await stores[0].track(SRC, [f"b{i}" for i in range(20)], "cli", NOW)
        entered = Knowledge(status="validating", seen=frozenset({"validating"}), sequence=1)

        async def race(store: PostgresStore) -> tuple[int, int]:
            writes = [
                Write(
                    replace(await row(store, f"b{i}"), knowledge=entered),
                    [event(f"b{i}", 1, event_type="batch.validating", event_id=f"evt_b{i}_1_{store.name}")],
                    expected_sequence=0,
                )
                for i in range(20)
            ]
            done = await store.record(writes, NOW)
            return done.enqueued, len(done.conflicts)

        results = await asyncio.gather(*(race(s) for s in stores))
        assert sum(enqueued for enqueued, _ in results) == 20  # each batch's write won exactly once
        assert sum(lost for _, lost in results) == 3 * 20
        for i in range(20):
            assert len(await stores[0].events_for(SRC, f"b{i}")) == 1
        positions = [e.position for e in await stores[0].read_events(0, 100)]
        assert positions == list(range(1, 21))  # no gaps, no repeats, in commit order
    finally:
        for s in stores:
            await s.__aexit__(None, None, None)


async def test_a_daemon_on_postgresql_delivers_every_transition_once_in_order(
    postgres_cluster: Cluster, postgres_database: str, tmp_path: Path
) -> None:
    sim = fast_sim(speed=0.001)  # frozen until every batch was seen validating
    async with serve(sim) as base_url:
        ids = sim.create_batches(10)
        events_file = tmp_path / "events.jsonl"
        raw = config_dict(base_url, tmp_path / "unused.db", [{"kind": "file", "path": str(events_file)}])
        raw["source"]["track"] = ids
        raw["state"] = {"url": postgres_cluster.url(postgres_database), "password_env": ENV}
        async with running(make_config(raw), environ={ENV: PASSWORD}) as daemon:
            assert daemon.store.description == postgres_cluster.url(postgres_database)
            await eventually(lambda: {e["data"]["id"] for e in read_jsonl(events_file)} == set(ids))
            sim.clock.speed = 40
            await eventually(lambda: all(sim.get(i)["status"] in FINAL for i in ids), timeout=60)
            await until(lambda: settled(daemon), timeout=40)
        check_event_log(read_jsonl(events_file), sim, ids)
    assert not (tmp_path / "unused.db").exists()
