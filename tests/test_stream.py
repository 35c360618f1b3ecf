"""`GET /v1/events`: the Server-Sent Events stream, against a real daemon polling simulators over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp

from poller.config import ServiceConfig
from poller.domain.events import encode
from poller.runtime.daemon import Daemon
from poller.service.app import Service, frame
from poller.service.stream import EventStream, Filters
from poller.sim import SimClock, serve
from poller.store import open_store
from poller.store.base import LoggedEvent, NewEvent, TrackedBatch, Write
from tests.helpers import (
    FINAL,
    KEY,
    KEY_ENV,
    config_dict,
    eventually,
    fast_sim,
    make_batch,
    make_config,
    make_event,
    read_jsonl,
    running,
)
from tests.postgres import PASSWORD
from tests.sse import SSEClient, connect
from tests.test_replicas import ENV, replica_config, sims
from tests.test_service import LOOPBACK, TOKEN, TOKEN_ENV, Stack, stack, two_sims, until


async def logged(st: Stack) -> list[LoggedEvent]:
    """Every published event in the log, in position order."""
    return [e for e in await st.daemon.store.read_events(0, 100_000) if e.type != "batch.pruned"]


def same_as_log(frames: Sequence[object], log: list[LoggedEvent]) -> None:
    assert [(f.position, f.event, f.data.encode()) for f in frames] == [(e.position, e.type, e.payload) for e in log]  # type: ignore[attr-defined]


def all_final(st: Stack) -> bool:
    return not st.runner.tracker.active()


async def test_resume_with_last_event_id_gets_every_missed_event_exactly_once(tmp_path):
    sim = fast_sim(speed=0.001)  # frozen until told to run
    ids = sim.create_batches(4)
    async with stack(tmp_path, sim, track=ids) as st:
        await eventually(lambda: len(read_jsonl(st.events)) == 4)
        first = await connect(st.http, params={"since": "0"})
        assert first.response.headers["Content-Type"].startswith("text/event-stream")
        assert first.response.headers["Cache-Control"] == "no-cache"
        await eventually(lambda: len(first.frames) == 4)
        assert first.retry == [3000]
        assert {f.event for f in first.frames} == {"batch.validating"}

        assert isinstance(sim.clock, SimClock)
        sim.clock.speed = 40
        await eventually(lambda: len(first.frames) >= 6)  # live events arrive on the open stream
        await first.close()
        seen = len(first.frames)

        async def recorded_while_away() -> bool:
            return len(await logged(st)) > seen

        await until(recorded_while_away)
        # The header wins over ?since=0, which would replay everything again.
        assert first.last_id is not None
        second = await connect(st.http, params={"since": "0"}, headers={"Last-Event-ID": first.last_id})
        await eventually(lambda: all_final(st), timeout=60)

        async def caught_up() -> bool:
            return bool(second.frames) and second.frames[-1].position == (await logged(st))[-1].position

        await until(caught_up)
        await second.close()
        log = await logged(st)
        same_as_log(first.frames + second.frames, log)
        # The data is the event exactly as the sinks got it.
        delivered = {e["id"]: e for e in read_jsonl(st.events)}
        assert {f.json["id"]: f.json for f in first.frames + second.frames} == delivered
        assert {f.json["data"]["status"] for f in second.frames} & FINAL


async def test_without_since_only_new_events_are_sent(tmp_path):
    sim = fast_sim(speed=0.001)
    old = sim.create_batches(2)
    async with stack(tmp_path, sim, track=old) as st:
        await eventually(lambda: len(read_jsonl(st.events)) == 2)
        client = await connect(st.http)
        # A position beyond the log's end (a state file started afresh) is where the log ends now.
        ahead = await connect(st.http, headers={"Last-Event-ID": "999999"})
        await eventually(lambda: client.retry == ahead.retry == [3000])
        [new] = sim.create_batches(1)
        assert (await st.post({"id": new}))[0] == 201
        await eventually(lambda: len(client.frames) == len(ahead.frames) == 1)
        assert client.frames[0].json["data"]["id"] == new
        assert client.frames[0].position == (await logged(st))[-1].position
        assert ahead.frames[0].position == client.frames[0].position
        await client.close()
        await ahead.close()


async def test_filters_by_source_batch_and_type_in_replay_and_live(tmp_path):
    sims = two_sims()
    a_ids = sims["alpha"].create_batches(2)
    [b_id] = sims["beta"].create_batches(1)
    async with stack(tmp_path, sims) as st:
        assert (await st.post({"ids": a_ids, "source": "alpha"}))[0] == 201
        assert (await st.post({"id": b_id, "source": "beta"}))[0] == 201
        await eventually(lambda: len(read_jsonl(st.events)) == 3)

        by_source = await connect(st.http, params={"since": "0", "source": "beta"})
        by_batch = await connect(st.http, params=[("since", "0"), ("batch", a_ids[0]), ("batch", b_id)])
        by_type = await connect(st.http, params={"since": "0", "type": "batch.completed,batch.failed,batch.expired"})
        both = await connect(st.http, params={"since": "0", "source": "alpha", "batch": f"{a_ids[1]},{b_id}"})
        clients = [by_source, by_batch, by_type, both]
        for sim in sims.values():
            assert isinstance(sim.clock, SimClock)
            sim.clock.speed = 40
        await eventually(lambda: all(not st.daemon.runner(n).tracker.active() for n in sims), timeout=60)

        log = await logged(st)
        wanted = {
            0: [e for e in log if e.source == "beta"],
            1: [e for e in log if e.batch_id in {a_ids[0], b_id}],
            2: [e for e in log if e.type in {"batch.completed", "batch.failed", "batch.expired"}],
            3: [e for e in log if e.source == "alpha" and e.batch_id == a_ids[1]],
        }
        for i, client in enumerate(clients):
            await eventually(lambda c=client, i=i: len(c.frames) >= len(wanted[i]))
        for i, client in enumerate(clients):
            await client.close()
            same_as_log(client.frames, wanted[i])
        assert len(wanted[2]) == 3  # every batch ended once
        assert {e.source for e in wanted[1]} == {"alpha", "beta"}


async def test_bad_queries_are_refused_with_400(tmp_path):
    async with stack(tmp_path, fast_sim(speed=0.001)) as st:
        for params in (
            {"since": "-1"},
            {"since": "abc"},
            {"type": "completed"},
            {"batch": "bad id!"},
            {"source": "a b"},
        ):
            status, body = await st.get("/v1/events", params=params)
            assert status == 400, params
            assert body["error"]["type"] == "invalid_request_error"
        status, _ = await st.get("/v1/events", headers={"Last-Event-ID": "1.5"})
        assert status == 400
        async with st.http.head("/v1/events") as resp:  # a stream has no HEAD: it would never end
            assert resp.status == 405


async def test_the_token_guards_the_stream_by_header_or_query(tmp_path):
    config = ServiceConfig(listen="127.0.0.1:0", token_env=TOKEN_ENV)
    async with stack(tmp_path, fast_sim(speed=0.001), service=config, environ={TOKEN_ENV: TOKEN}) as st:
        for kwargs in (
            {},
            {"headers": {"Authorization": "Bearer wrong"}},
            {"params": {"token": "wrong"}},
            {"params": {"token": TOKEN}, "headers": {"Authorization": "Bearer wrong"}},  # a header is never overruled
        ):
            status, body = await st.get("/v1/events", **kwargs)
            assert status == 401, kwargs
            assert body["error"]["type"] == "authentication_error"
        # ?token= is for the stream only (EventSource cannot send headers); other routes want the header.
        assert (await st.get("/v1/status", params={"token": TOKEN}))[0] == 401

        by_header = await connect(st.http, headers={"Authorization": f"Bearer {TOKEN}"})
        by_query = await connect(st.http, params={"token": TOKEN})
        await eventually(lambda: by_header.retry == by_query.retry == [3000])
        await by_header.close()
        await by_query.close()


async def test_heartbeats_keep_an_idle_stream_alive(tmp_path):
    async with (
        stack(tmp_path, fast_sim(speed=0.001)) as st,
        Service(st.control, LOOPBACK, heartbeat=0.05) as svc,
        aiohttp.ClientSession(base_url=svc.url) as http,
    ):
        client = await connect(http)
        await eventually(lambda: client.comments.count("keep-alive") >= 3)
        assert client.frames == []
        await client.close()


async def test_fifty_clients_get_every_event_and_polling_carries_on(tmp_path):
    sim = fast_sim(speed=40, seed=11)
    ids = sim.create_batches(12)
    async with stack(tmp_path, sim, track=ids) as st:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(base_url=st.service.url, connector=connector) as http:
            clients: list[SSEClient] = list(
                await asyncio.gather(*(connect(http, params={"since": "0"}) for _ in range(50)))
            )
            # One more that never reads what it is sent: it must hold up nobody.
            host, port = st.service.url.removeprefix("http://").split(":")
            _, stuck = await asyncio.open_connection(host, int(port))
            stuck.write(b"GET /v1/events?since=0 HTTP/1.1\r\nHost: x\r\n\r\n")
            await stuck.drain()
            refreshes = st.runner.view()["requests"]

            # Polling carries on: every batch is followed to its end and delivered to the file sink.
            await eventually(lambda: all_final(st), timeout=60)
            await eventually(
                lambda: {e["data"]["id"] for e in read_jsonl(st.events) if e["data"]["status"] in FINAL} == set(ids)
            )
            assert sum(st.runner.view()["requests"].values()) > sum(refreshes.values())

            log = await logged(st)
            assert len(log) >= 12 * 3
            await eventually(lambda: all(len(c.frames) >= len(log) for c in clients))
            for client in clients:
                same_as_log(client.frames, log)
            assert st.service.stream_clients == 51
            stuck.close()
            for client in clients:
                await client.close()


class MemoryLog:
    """An event log in a list, to drive the ring and the catch-up path through their edges."""

    def __init__(self) -> None:
        self.events: list[LoggedEvent] = []
        self.reads = 0

    def add(self, position: int, source: str = "s", batch: str = "b", kind: str = "batch.progress") -> None:
        self.events.append(LoggedEvent(position, source, batch, kind, b"{}"))

    async def read_events(self, after, limit, *, sources=(), batch_ids=(), types=()):
        self.reads += 1
        rows = [
            e
            for e in self.events
            if e.position > after
            and (not sources or e.source in sources)
            and (not batch_ids or e.batch_id in batch_ids)
            and (not types or e.type in types)
        ]
        return rows[:limit]

    async def last_position(self):
        return self.events[-1].position if self.events else 0


async def test_a_client_behind_the_ring_catches_up_from_the_log_then_follows_live():
    log = MemoryLog()
    for position in range(1, 40, 2):  # gaps, as after pruning
        log.add(position, batch="a" if position % 3 else "b")
    stream = EventStream(log, ring_size=4, page=3, fallback_read=60)  # type: ignore[arg-type]
    await stream.start()
    assert stream.head == 39
    for position in range(41, 60, 2):  # live: more than the ring holds, while nobody reads
        log.add(
            position, batch="a" if position % 3 else "b", kind="batch.pruned" if position == 45 else "batch.progress"
        )
    stream.notify(59)
    await eventually(lambda: stream.head == 59)

    got: list[int] = []
    only_b: list[int] = []

    async def follow(into: list[int], filters: Filters) -> None:
        async for events in stream.follow(0, filters, idle=60):
            into.extend(e.position for e in events)

    tasks = [
        asyncio.create_task(follow(got, Filters())),
        asyncio.create_task(follow(only_b, Filters(batch_ids=("b",)))),
    ]
    everything = [e.position for e in log.events if e.type != "batch.pruned"]
    await eventually(lambda: got == everything)
    await eventually(
        lambda: only_b == [e.position for e in log.events if e.batch_id == "b" and e.type != "batch.pruned"]
    )
    log.add(61)
    stream.notify(None)
    await eventually(lambda: got[-1] == 61)
    reads = log.reads
    stream.notify(61)  # nothing new: the reader does not touch the log
    await asyncio.sleep(0)
    assert log.reads == reads
    await stream.close()
    await asyncio.gather(*tasks)
    assert got == [*everything, 61]


async def test_the_daemons_own_service_streams_and_ends_streams_when_it_stops(tmp_path):
    sim = fast_sim(speed=0.001)
    ids = sim.create_batches(2)
    async with serve(sim) as url:
        raw = config_dict(
            url, tmp_path / "state.db", [{"kind": "file", "name": "file", "path": str(tmp_path / "e.jsonl")}]
        )
        raw["source"]["track"] = ids
        raw["service"] = {"listen": "127.0.0.1:0"}
        daemon = Daemon(make_config(raw), environ={KEY_ENV: KEY})
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)
        assert daemon.service is not None
        async with aiohttp.ClientSession(base_url=daemon.service.url) as http:
            client = await connect(http, params={"since": "0"})
            await eventually(lambda: len(client.frames) == 2)
            daemon.stop()
            assert await asyncio.wait_for(task, 30) == 0
            assert client.task is not None
            await asyncio.wait_for(client.task, 10)  # the stream ended with the daemon
            assert daemon.recording_listeners == []


async def test_events_another_process_writes_reach_the_stream(tmp_path):
    sim = fast_sim(speed=0.001)
    async with stack(tmp_path, sim) as st:
        client = await connect(st.http)
        await eventually(lambda: client.retry == [3000])
        event = make_event(
            source="openai",
            batch=make_batch("validating", "batch_elsewhere"),
            event_type="batch.validating",
            status="validating",
            previous_status=None,
            sequence=1,
            created_at=1_700_000_000,
            detected_at=time.time(),
        )
        row = NewEvent(event.id, event.type, 1, event.created_at, event.data.detected_at, encode(event), [])
        # A second writer of the same state file, as `batch-poller` commands or another replica are.
        async with open_store(tmp_path / "state.db") as other:
            now = time.time()
            await other.track("openai", ["batch_elsewhere"], "cli", now)
            await other.record([Write(TrackedBatch("openai", "batch_elsewhere", "cli", now), [row])], now)
        await eventually(lambda: len(client.frames) == 1)
        assert client.frames[0].data.encode() == encode(event)
        await client.close()


async def test_a_replicas_stream_carries_the_events_another_replica_records(
    postgres_cluster, postgres_database, tmp_path
):
    async with sims(2, speed=0.001) as served:
        urls = {name: url for name, (_, url) in served.items()}
        env = {ENV: PASSWORD}
        a_raw = replica_config(postgres_cluster, postgres_database, urls, tmp_path, "alpha", lease_ttl="30s")
        a_raw["service"] = {"listen": "127.0.0.1:0"}
        b_raw = replica_config(postgres_cluster, postgres_database, urls, tmp_path, "beta", lease_ttl="30s")
        b_raw["service"] = {"listen": "127.0.0.1:0"}
        async with running(make_config(a_raw), environ=env) as a, running(make_config(b_raw), environ=env) as b:
            await eventually(lambda: len(a.polling()) == 1 and len(b.polling()) == 1, timeout=30)
            assert a.service is not None
            async with aiohttp.ClientSession(base_url=a.service.url) as http:
                client = await connect(http, params={"since": "0"})
                created = {
                    name: sim.create_batches(2) for name, (sim, _) in served.items()
                }  # discovered by each poller
                await eventually(
                    lambda: (
                        {(f.json["data"]["source"], f.json["data"]["id"]) for f in client.frames}
                        == {(s, i) for s, ids in created.items() for i in ids}
                    ),
                    timeout=30,
                )
                log = [e for e in await a.store.read_events(0, 1000) if e.type != "batch.pruned"]
                await client.close()
                same_as_log(client.frames, log)
                assert {e.source for e in log} == set(b.polling()) | set(a.polling())
            # The positions are the shared log's: a client resumes on another replica where it left off.
            assert b.service is not None
            async with aiohttp.ClientSession(base_url=b.service.url) as http:
                half = client.frames[len(client.frames) // 2 - 1]
                resumed = await connect(http, headers={"Last-Event-ID": str(half.id)})
                await eventually(lambda: len(resumed.frames) >= len(log) - len(client.frames) // 2)
                await resumed.close()
                same_as_log(resumed.frames, log[len(client.frames) // 2 :])


def test_a_frame_is_one_event_with_its_position_type_and_json():
    event = LoggedEvent(7, "openai", "batch_a", "batch.progress", b'{"id":"evt_1","object":"event"}')
    assert frame(event) == b'id: 7\nevent: batch.progress\ndata: {"id":"evt_1","object":"event"}\n\n'
    # A payload of several lines (never canonical JSON) still makes one frame, each line a data field.
    assert (
        frame(LoggedEvent(8, "s", "b", "batch.progress", b'{"a":\n1}'))
        == b'id: 8\nevent: batch.progress\ndata: {"a":\ndata: 1}\n\n'
    )


async def test_a_recording_costs_one_log_read_however_many_clients_follow():
    log = MemoryLog()
    log.add(1)
    stream = EventStream(log, fallback_read=60)  # type: ignore[arg-type]
    await stream.start()
    got: list[list[int]] = [[] for _ in range(50)]

    async def follow(into: list[int]) -> None:
        async for events in stream.follow(1, Filters(), idle=60):
            into.extend(e.position for e in events)

    tasks = [asyncio.create_task(follow(into)) for into in got]
    await asyncio.sleep(0)  # every follower is waiting
    reads = log.reads
    log.add(2)
    stream.notify(2)
    await eventually(lambda: all(into == [2] for into in got))
    assert log.reads == reads + 1
    await stream.close()
    await asyncio.gather(*tasks)
