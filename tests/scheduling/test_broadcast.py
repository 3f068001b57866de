"""A broadcast fire settles to one final status once every shard reported.

Each shard's outcome is kept under ``shards["<index>"]``; the fire itself ends
``succeeded`` when every shard succeeded, else ``failed`` if any failed (else the
status of the lowest shard that did not succeed), with that shard named in ``error``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from asgi_dist.scheduling import JobContext, SchedulerConfig
from asgi_dist.scheduling.dispatch import Dispatcher
from asgi_dist.scheduling.store_redis import RedisStore
from tests.helpers.processes import ProcessGroup
from tests.scheduling.test_claim import claim, open_store
from tests.scheduling.test_cluster import NODE, observer_dist, runs, stop_all, wait_for
from tests.scheduling.test_jobs import NEVER, leading, settle
from tests.scheduling.test_redelivery import TIMING, confession


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_a_broadcast_fire_settles_once_every_shard_reported(
    sched_dist: Any, backend: str
) -> None:
    store = await open_store(sched_dist, backend)
    fire_ms = await store.now_ms() - 5000
    outcomes = {"ok": ["succeeded"] * 3, "bad": ["succeeded", "failed", "cancelled"]}
    for name, statuses in outcomes.items():
        fire_id = f"{name}:{fire_ms}"
        taken = claim(
            fire_ms, job=name, fire_id=fire_id, expected=None, advance=False, signature=""
        )
        assert (await store.claim(taken)).status == "claimed"
        await store.finish(name, fire_id, {"status": "dispatched"}, release=False)
        for index in (2, 0, 1):  # shards finish in any order
            rec = await store.record(name, fire_id)
            assert rec is not None and rec["status"] == "dispatched", rec
            error = None if statuses[index] == "succeeded" else f"attempt 2: boom {index}"
            patch = {"status": statuses[index], "attempt": index + 1, "error": error}
            await store.finish(name, fire_id, patch, release=False, shard=(index, 3))
    ok = await store.record("ok", f"ok:{fire_ms}")
    assert ok is not None and ok["status"] == "succeeded" and ok["error"] is None, ok
    assert ok["attempt"] == 3 and ok["shard_total"] == 3
    assert [ok["shards"][str(i)]["status"] for i in range(3)] == ["succeeded"] * 3
    bad = await store.record("bad", f"bad:{fire_ms}")
    assert bad is not None and bad["status"] == "failed", bad
    assert bad["error"] == "shard 1 of 3: attempt 2: boom 1", bad
    assert bad["shards"]["2"]["status"] == "cancelled"


async def test_a_broadcast_fire_records_its_final_status_and_each_shard(sched_dist: Any) -> None:
    dist = await sched_dist(start=False)

    @dist.cron(NEVER, broadcast=True)
    async def fanout(ctx: JobContext) -> None:
        if ctx.payload == "fail":
            raise RuntimeError(f"shard {ctx.shard_index} broke")

    await dist.start()
    await leading(dist)
    fire_id = await dist.scheduler.trigger("fanout")
    record = await settle(dist, "fanout", fire_id)
    assert record["status"] == "succeeded" and record["attempt"] == 1, record
    assert record["shards"]["0"]["status"] == "succeeded", record
    assert record["shard_total"] == 1 and record["members"] == [dist.runtime.node_id]
    fire_id = await dist.scheduler.trigger("fanout", payload="fail")
    record = await settle(dist, "fanout", fire_id)
    assert record["status"] == "failed", record
    assert record["error"] == "shard 0 of 1: attempt 1: RuntimeError: shard 0 broke", record


async def broadcast_fire(sched_dist: Any, others: list[str]) -> tuple[RedisStore, Dispatcher, str]:
    """A broadcast fire of job ``fan`` claimed with a 200 ms run lease and dispatched to
    this process (a live member, shard 0) and ``others``, as the leader's hand-over
    leaves it."""
    dist = await sched_dist(start=False, scheduler=SchedulerConfig(enabled=False))

    @dist.cron(NEVER, broadcast=True)
    async def fan(ctx: JobContext) -> None: ...

    await dist.start()
    store = dist.scheduler.store
    assert isinstance(store, RedisStore) and dist.runtime.redis is not None
    dispatcher = Dispatcher(dist.runtime.redis, store, dist.runtime.node_id, 2.0)
    await dispatcher.join(member=True)
    fire_ms = await store.now_ms() - 5000
    fire_id = f"fan:{fire_ms}"
    taken = claim(
        fire_ms, job="fan", fire_id=fire_id, expected=None, advance=False, signature="",
        lease_ms=200,
    )  # fmt: skip
    assert (await store.claim(taken)).status == "claimed"
    members = [dispatcher.node_id, *others]
    patch = {"status": "dispatched", "shard_total": len(members), "members": members}
    assert await store.finish("fan", fire_id, patch, release=False)
    return store, dispatcher, fire_id


async def test_a_shard_whose_member_is_gone_is_recorded_lost_and_the_fire_settles(
    sched_dist: Any,
) -> None:
    store, dispatcher, fire_id = await broadcast_fire(sched_dist, ["ghost"])
    me = dispatcher.node_id
    assert await dispatcher.start_shard("fan", fire_id, 0) == "running"
    await asyncio.sleep(0.3)  # the claim's run lease lapsed: the leader looks at the shards
    live = await dispatcher.members()
    assert me in live and "ghost" not in live
    # Shard 0 still runs on a live member: the fire waits for it.
    assert await store.reap_lost("fan", members=live) == []
    rec = await store.record("fan", fire_id)
    assert rec is not None and rec["status"] == "dispatched", rec
    assert rec["shards"]["1"]["status"] == "lost" and rec["shards"]["0"]["status"] == "running"
    assert "ghost stopped its membership heartbeat" in rec["shards"]["1"]["error"], rec
    # The ghost wakes and reports: its shard stays lost.
    late = {"status": "succeeded", "attempt": 1, "error": None}
    assert not await store.finish("fan", fire_id, late, release=False, shard=(1, 2))
    assert await store.finish("fan", fire_id, late, release=False, shard=(0, 2))
    rec = await store.record("fan", fire_id)
    assert rec is not None and rec["status"] == "lost", rec
    assert rec["error"].startswith("shard 1 of 2: member ghost stopped"), rec
    assert await store.reap_lost("fan", members=live) == []  # settled: nothing left to do
    assert not await store.has_runs("fan")


async def test_a_shard_its_live_member_never_started_is_abandoned_and_never_starts(
    sched_dist: Any,
) -> None:
    store, dispatcher, fire_id = await broadcast_fire(sched_dist, [])
    await asyncio.sleep(0.3)
    # Without the live members the leader cannot tell: the fire waits.
    assert await store.reap_lost("fan") == []
    assert await store.has_runs("fan")
    assert await store.reap_lost("fan", members=await dispatcher.members()) == []
    rec = await store.record("fan", fire_id)
    assert rec is not None and rec["status"] == "abandoned", rec
    assert "did not start its shard within the run lease" in rec["error"], rec
    # The member reads the entry late: the compare-and-set refuses the start.
    assert await dispatcher.start_shard("fan", fire_id, 0) == "abandoned"


@pytest.mark.parametrize("signal_", ["kill", "freeze"])
async def test_a_broadcast_fire_whose_member_dies_mid_shard_settles_lost(
    signal_: str,
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
) -> None:
    env = {"REDIS_URL": redis_url, "NAMESPACE": namespace, "JOBS": "broadcast", **TIMING}
    processes.python(NODE, 2, env=env)

    async def some_run() -> bool:
        return bool(await runs(redis_client, namespace))

    await wait_for(some_run, 20, "a first broadcast")
    (victim,) = processes.python(NODE, 1, env={**env, "VICTIM": signal_})
    held = await confession(redis_client, namespace)
    if signal_ == "kill":
        victim.kill()  # SIGKILL mid-shard: the shard never reports
    observer = await observer_dist(make_dist, redis_url)

    async def final() -> dict[str, Any] | None:
        rec = await observer.scheduler.store.record("fanout", held["fire_id"])
        return rec if rec is not None and rec["status"] != "dispatched" else None

    await wait_for(final, 20, f"{held['fire_id']} to reach a final status")
    if signal_ == "freeze":
        victim.cont()  # wakes, its shard succeeds: too late, it was recorded lost

        async def victim_runs_again() -> bool:
            recorded = await runs(redis_client, namespace)
            return sum(r["pid"] == victim.pid for r in recorded) >= 2

        await wait_for(victim_runs_again, 20, "the woken node to run a later shard")
    stop_all(processes)
    rec = await final()
    assert rec is not None and rec["status"] == "lost", rec
    index = str(held["shard"])
    assert rec["shards"][index]["status"] == "lost", rec
    assert rec["shards"][index]["node"] == held["node"], rec
    others = [s for i, s in rec["shards"].items() if i != index]
    assert others and all(s["status"] == "succeeded" for s in others), rec
    assert rec["error"].startswith(f"shard {index} of {rec['shard_total']}: member"), rec
    print(f"{held['fire_id']}: member {signal_}ed mid-shard, settled {rec['error']}")


async def test_a_member_reads_every_broadcast_sharded_after_it_joined(sched_dist: Any) -> None:
    """The leader may shard a fire over a node between its first heartbeat and its first
    read of the stream: that node must still run its shard, not skip past it."""
    dist = await sched_dist(scheduler=SchedulerConfig(enabled=False))
    store = dist.scheduler.store
    assert isinstance(store, RedisStore) and dist.runtime.redis is not None
    node = Dispatcher(dist.runtime.redis, store, "joiner", 2.0)
    leader = Dispatcher(dist.runtime.redis, store, "leader", 2.0)
    await leader.send_broadcast({"fire_id": "fan:1"})  # before the node joined
    await node.join(member=True)
    assert "joiner" in await leader.members()
    await leader.send_broadcast({"fire_id": "fan:2"})  # sharded over it, not yet read
    received: list[str] = []

    async def handle(entry: dict[str, Any]) -> None:
        received.append(entry["fire_id"])

    reader = asyncio.create_task(node.consume_broadcast_forever(handle))
    try:
        await wait_for(lambda: asyncio.sleep(0, bool(received)), 5, "the entry to be read")
    finally:
        reader.cancel()
    assert received == ["fan:2"]
