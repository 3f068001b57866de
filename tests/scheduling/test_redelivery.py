"""run_on="any": a fire received by a node that dies before starting it is redelivered
and runs exactly once elsewhere; a fire whose node dies while running it is recorded
as lost and never started again.

Real processes (tests/scheduling/workers.py, ``JOBS=redeliver``): two healthy nodes
start first (one leads), then a victim node that freezes itself on its first
delivery (or hangs in its first run), so the test knows exactly which fire it holds.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.scheduling import JobContext, SchedulerConfig
from asgi_dist.scheduling.store_redis import RedisStore
from tests.helpers.processes import ProcessGroup, Worker
from tests.scheduling.test_cluster import NODE, observer_dist, runs, stop_all, wait_for
from tests.scheduling.test_jobs import NEVER, leading, settle

TIMING = {"LEADER_TTL": "2", "REDELIVER_AFTER": "1", "RUNNING_LEASE": "1"}


async def start_cluster(
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    client: aioredis.Redis,
    victim: str,
) -> Worker:
    """Two healthy nodes, then (once one of them leads) the victim; returns the victim."""
    env = {"REDIS_URL": redis_url, "NAMESPACE": namespace, "JOBS": "redeliver", **TIMING}
    processes.python(NODE, 2, env=env)

    async def some_run() -> bool:
        return bool(await runs(client, namespace))

    await wait_for(some_run, 20, "a first run")
    (node,) = processes.python(NODE, 1, env={**env, "VICTIM": victim})
    return node


async def confession(client: aioredis.Redis, namespace: str) -> dict[str, Any]:
    """What the victim holds: ``{fire_id, node, pid}``, written just before it stops."""

    async def written() -> bool:
        return bool(await client.exists(f"{namespace}:victim"))

    await wait_for(written, 20, "the victim to receive a fire")
    held: dict[str, Any] = json.loads(await client.get(f"{namespace}:victim"))
    return held


async def record(observer: Dist, fire_id: str) -> dict[str, Any] | None:
    return await observer.scheduler.store.record("anywhere", fire_id)


def assert_no_fire_ran_twice(recorded: list[dict[str, Any]]) -> None:
    counts = Counter(r["fire_id"] for r in recorded)
    assert not [f for f, n in counts.items() if n > 1], f"fires started twice: {counts}"


async def test_fire_received_by_a_frozen_node_runs_exactly_once_on_another(
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
) -> None:
    victim = await start_cluster(processes, redis_url, namespace, redis_client, "receive")
    held = await confession(redis_client, namespace)
    fire_id = held["fire_id"]
    assert held["pid"] == victim.pid

    async def ran_elsewhere() -> bool:
        return any(r["fire_id"] == fire_id for r in await runs(redis_client, namespace))

    # The frozen node holds the entry unacknowledged; the leader hands it out again.
    await wait_for(ran_elsewhere, 15, f"{fire_id} to be redelivered")
    victim.cont()  # it wakes and tries its compare-and-set: too late, starts nothing

    async def victim_runs_again() -> bool:
        return any(r["pid"] == victim.pid for r in await runs(redis_client, namespace))

    # Awake, it still takes part: it runs later fires (and never the one it held).
    await wait_for(victim_runs_again, 15, "the woken node to run a later fire")
    stop_all(processes)
    recorded = await runs(redis_client, namespace)
    assert_no_fire_ran_twice(recorded)
    starts = [r for r in recorded if r["fire_id"] == fire_id]
    assert len(starts) == 1 and starts[0]["pid"] != victim.pid, starts
    observer = await observer_dist(make_dist, redis_url)
    rec = await record(observer, fire_id)
    assert rec is not None and rec["status"] == "succeeded", rec
    # Started by its second delivery, on another node.
    assert rec["node"] != held["node"] and rec["delivery"] == 2, rec
    print(f"{fire_id}: frozen on delivery, redelivered and run once on pid {starts[0]['pid']}")


async def test_fire_whose_node_died_while_running_is_recorded_lost_not_rerun(
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
) -> None:
    victim = await start_cluster(processes, redis_url, namespace, redis_client, "run")
    held = await confession(redis_client, namespace)
    fire_id = held["fire_id"]
    victim.kill()  # SIGKILL mid-run: its run lease is no longer renewed
    observer = await observer_dist(make_dist, redis_url)

    async def lost() -> bool:
        rec = await record(observer, fire_id)
        return rec is not None and rec["status"] == "lost"

    await wait_for(lost, 15, f"{fire_id} to be recorded lost")
    await asyncio.sleep(1.5)  # time for a wrong redelivery to show up
    stop_all(processes)
    recorded = await runs(redis_client, namespace)
    assert_no_fire_ran_twice(recorded)
    starts = [r for r in recorded if r["fire_id"] == fire_id]
    assert [r["pid"] for r in starts] == [victim.pid], starts
    rec = await record(observer, fire_id)
    assert rec is not None and rec["status"] == "lost" and rec["node"] == held["node"], rec
    assert "not started again" in rec["error"], rec
    # Later fires kept running on the healthy nodes.
    after = recorded.index(starts[0])
    assert len({r["fire_id"] for r in recorded[after + 1 :]}) >= 2, recorded[after:]
    print(f"{fire_id}: node killed mid-run, recorded {rec['status']}: {rec['error']}")


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_fire_whose_leader_died_running_it_is_recorded_lost_not_rerun(
    backend: str,
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
    request: pytest.FixtureRequest,
) -> None:
    env = {"REDIS_URL": redis_url, "NAMESPACE": namespace, "JOBS": "redeliver", **TIMING}
    env["RUN_ON"] = "leader"
    postgres = None
    if backend == "postgres":  # election, claims, run leases and history in PostgreSQL
        postgres = env["POSTGRES_DSN"] = request.getfixturevalue("postgres_dsn")
    (victim,) = processes.python(NODE, 1, env={**env, "VICTIM": "run"})  # alone: it leads
    held = await confession(redis_client, namespace)
    fire_id = held["fire_id"]
    processes.python(NODE, 2, env=env)
    victim.kill()  # SIGKILL the leader mid-run: a new leader takes over and reaps
    observer = await observer_dist(make_dist, redis_url, postgres)

    async def lost() -> bool:
        rec = await record(observer, fire_id)
        return rec is not None and rec["status"] == "lost"

    await wait_for(lost, 20, f"{fire_id} to be recorded lost")
    stop_all(processes)
    recorded = await runs(redis_client, namespace)
    assert_no_fire_ran_twice(recorded)
    assert [r["pid"] for r in recorded if r["fire_id"] == fire_id] == [victim.pid]
    rec = await record(observer, fire_id)
    assert rec is not None and rec["node"] == held["node"] and rec["status"] == "lost", rec
    print(f"{fire_id}: leader killed mid-run, recorded {rec['status']}: {rec['error']}")


async def any_node(sched_dist: Any, started: list[str], redeliver_after: float = 0.2) -> Dist:
    """One node (it leads) with a triggered run_on="any" job; quick redelivery."""
    config = SchedulerConfig(redeliver_after=redeliver_after, max_deliveries=3)
    dist: Dist = await sched_dist(start=False, scheduler=config)

    @dist.cron(NEVER, run_on="any")
    async def anywhere(ctx: JobContext) -> None:
        started.append(ctx.fire_id)

    await dist.start()
    await leading(dist)
    return dist


async def pending(dist: Dist, client: aioredis.Redis) -> int:
    assert dist.runtime.redis is not None
    summary: Any = await client.xpending(
        dist.runtime.redis.key("schedctl", "cluster", "any"), "nodes"
    )
    return int(summary["pending"])


async def test_a_second_delivery_of_a_started_fire_starts_nothing(
    sched_dist: Any, redis_client: aioredis.Redis
) -> None:
    started: list[str] = []
    dist = await any_node(sched_dist, started)
    fire_id = await dist.scheduler.trigger("anywhere")
    first = await settle(dist, "anywhere", fire_id)
    assert first["status"] == "succeeded" and first["delivery"] == 1, first
    # The same entry again, as a redelivery racing a slow first receiver would send it.
    assert dist.runtime.redis is not None
    entry = {"job": "anywhere", "fire_id": fire_id, "fire_ms": first["fire_ms"], "fence": 1}
    stream = dist.runtime.redis.key("schedctl", "cluster", "any")
    await redis_client.xadd(stream, {"entry": json.dumps({**entry, "delivery": 2})})

    async def acknowledged() -> bool:
        return await pending(dist, redis_client) == 0 and await redis_client.xlen(stream) == 2

    await wait_for(acknowledged, 5, "the duplicate to be acknowledged")
    await asyncio.sleep(0.2)
    assert started == [fire_id]
    assert await dist.scheduler.store.record("anywhere", fire_id) == first


async def test_a_fire_no_node_can_start_is_abandoned_after_max_deliveries(
    sched_dist: Any, redis_client: aioredis.Redis
) -> None:
    dist = await any_node(sched_dist, [])
    # A fire of a job this deployment does not know (another version handed it out):
    # no node starts it, so it must not sit "dispatched" forever.
    assert dist.runtime.redis is not None
    key = dist.runtime.redis.key
    fire_id = "retired:1000"
    rec = {"fire_id": fire_id, "job": "retired", "fire_ms": 1000, "status": "dispatched"}
    await redis_client.hset(key("sched", "retired", "hist"), fire_id, json.dumps(rec))
    entry = {"job": "retired", "fire_id": fire_id, "fire_ms": 1000, "fence": 1}
    await redis_client.xadd(key("schedctl", "cluster", "any"), {"entry": json.dumps(entry)})

    async def abandoned() -> bool:
        raw = await redis_client.hget(key("sched", "retired", "hist"), fire_id)
        return json.loads(raw)["status"] == "abandoned"

    await wait_for(abandoned, 10, f"{fire_id} to be abandoned")
    raw = await redis_client.hget(key("sched", "retired", "hist"), fire_id)
    assert json.loads(raw)["error"] == "no node started it after 3 deliveries"

    async def drained() -> bool:
        return await pending(dist, redis_client) == 0

    await wait_for(drained, 5, "the stream's pending list to drain")


async def test_run_on_any_keeps_running_after_redis_loses_its_data(
    sched_dist: Any, redis_server: Any
) -> None:
    seen: list[str] = []
    dist = await sched_dist(start=False, redis=redis_server.url, postgres=None)

    @dist.every(seconds=0.2, run_on="any")
    async def steady(ctx: JobContext) -> None:
        seen.append(ctx.fire_id)

    await dist.start()

    async def runs_after(count: int) -> bool:
        return len(seen) >= count

    await wait_for(lambda: runs_after(3), 20, "first runs")
    redis_server.kill()  # an empty server comes back: the stream and its group are gone
    await asyncio.sleep(1.0)
    before = len(seen)
    redis_server.start()
    await wait_for(lambda: runs_after(before + 3), 20, "runs after the restart")
    assert len(set(seen)) == len(seen)


async def test_leader_forgets_dead_consumers_but_never_one_holding_a_fire(
    sched_dist: Any, redis_client: aioredis.Redis
) -> None:
    dist = await any_node(sched_dist, [], redeliver_after=60)  # no redelivery meanwhile
    dispatcher = dist.scheduler._dispatcher
    assert dispatcher is not None
    stream = dispatcher.any_stream
    # "gone" read nothing and holds nothing; "holder" died holding an entry.
    await redis_client.xgroup_createconsumer(stream, "nodes", "gone")
    async with redis_client.pipeline(transaction=True) as tx:
        # One MULTI: "holder" reads the entry before the node's blocked read is served.
        tx.xadd(stream, {"entry": json.dumps({"job": "x", "fire_id": "x:1"})})
        tx.xreadgroup("nodes", "holder", {stream: ">"}, count=1)
        await tx.execute()
    assert await dispatcher.prune_consumers(0) == 1
    names = {c["name"].decode() for c in await redis_client.xinfo_consumers(stream, "nodes")}
    assert "gone" not in names and "holder" in names, names


async def test_run_on_any_and_its_recovery_work_on_redis_cluster(
    sched_dist: Any, cluster_url: str
) -> None:
    started: list[str] = []
    config = SchedulerConfig(redeliver_after=0.2)
    dist = await sched_dist(start=False, redis=cluster_url, postgres=None, scheduler=config)

    @dist.cron(NEVER, run_on="any")
    async def anywhere(ctx: JobContext) -> None:
        started.append(ctx.fire_id)

    await dist.start()
    await leading(dist)
    fire_id = await dist.scheduler.trigger("anywhere")
    record = await settle(dist, "anywhere", fire_id)
    assert record["status"] == "succeeded" and record["delivery"] == 1, record
    assert started == [fire_id]
    # Every recovery script runs on the job's (or the stream's) one slot.
    dispatcher = dist.scheduler._dispatcher
    assert dispatcher is not None
    assert await dispatcher.redeliver(0, 3) == 0
    assert await dispatcher.prune_consumers(3_600_000) == 0
    store = dist.scheduler.store
    assert isinstance(store, RedisStore)
    assert await store.reap_lost("anywhere") == []
