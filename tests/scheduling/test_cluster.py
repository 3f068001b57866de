"""Several real processes share one schedule: each fire runs once, failover is fast.

Each process is a full Dist with the scheduler (leader_ttl 2 s).  Jobs append
their fire id to Redis; history (from the store) explains every fire that did
not run.  Failover times are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig
from tests.helpers.processes import ProcessGroup, Worker

NODE = "from tests.scheduling.workers import main; main()"
JOBS = ("tick", "crontick")


async def runs(client: aioredis.Redis, namespace: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in await client.lrange(f"{namespace}:runs", 0, -1)]


async def wait_for(predicate: Any, within: float, what: str) -> float:
    """Poll ``predicate`` (async, bounded); returns the monotonic time it became true."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


def stop_all(processes: ProcessGroup) -> None:
    """SIGTERM every node at once (one by one would hand leadership down the line)."""
    live = [w for w in processes.workers if w.proc.poll() is None]
    for worker in live:
        worker.proc.terminate()
    for worker in live:
        worker.terminate()


def start_nodes(processes: ProcessGroup, redis_url: str, namespace: str, n: int) -> list[Worker]:
    env = {"REDIS_URL": redis_url, "NAMESPACE": namespace}
    return processes.python(NODE, n, env=env)


async def leader_pid(client: aioredis.Redis, namespace: str, after: int = 0) -> int:
    async def some() -> bool:
        return len(await runs(client, namespace)) > after

    await wait_for(some, 20, "a first run")
    return int((await runs(client, namespace))[-1]["pid"])


async def assert_each_fire_once(observer: Dist, recorded: list[dict[str, Any]]) -> dict[str, Any]:
    """No fire ran twice; every fire between the first and the last is accounted for."""
    report: dict[str, Any] = {}
    for job in JOBS:
        fire_ids = [r["fire_id"] for r in recorded if r["job"] == job]
        duplicates = [f for f, n in Counter(fire_ids).items() if n > 1]
        assert not duplicates, f"{job}: fires ran more than once: {duplicates}"
        history = await observer.scheduler.history(job, 500)
        status = {h["fire_id"]: h["status"] for h in history}
        ran = {int(f.rpartition(":")[2]) for f in fire_ids}
        first, last = min(ran), max(ran)
        expected = range(first, last + 1, 1000)
        unaccounted = [ms for ms in expected if ms not in ran and f"{job}:{ms}" not in status]
        assert not unaccounted, f"{job}: fires neither run nor recorded: {unaccounted}"
        # A fire not in the run log is explained by its history record.
        for ms in expected:
            if ms not in ran:
                assert status[f"{job}:{ms}"] in ("missed", "claimed"), status[f"{job}:{ms}"]
        report[job] = {
            "ran": len(ran),
            "missed": sum(1 for s in status.values() if s == "missed"),
            "span": len(expected),
        }
    return report


async def observer_dist(make_dist: Any, redis_url: str, postgres: str | None = None) -> Dist:
    from asgi_dist.transactions import TransactionConfig

    dist: Dist = await make_dist(
        redis=None if postgres else redis_url,
        postgres=postgres,
        sessions=False,
        transactions=TransactionConfig(enabled=False),
        scheduler=SchedulerConfig(enabled=False),
    )
    return dist


async def test_three_processes_run_every_fire_exactly_once(
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
) -> None:
    start_nodes(processes, redis_url, namespace, 3)
    await leader_pid(redis_client, namespace)
    await asyncio.sleep(5)
    stop_all(processes)
    recorded = await runs(redis_client, namespace)
    report = await assert_each_fire_once(await observer_dist(make_dist, redis_url), recorded)
    for job in JOBS:
        # Steady state: every fire ran, none was missed.
        assert report[job]["ran"] == report[job]["span"] >= 4, report
        assert report[job]["missed"] == 0, report
    print("steady state:", report)


async def test_paused_leader_that_wakes_up_runs_no_fire_twice(
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
) -> None:
    workers = {w.pid: w for w in start_nodes(processes, redis_url, namespace, 3)}
    old = await leader_pid(redis_client, namespace)
    workers[old].stop()  # SIGSTOP: the leader freezes with its lease and its loop intact
    paused_at = time.monotonic()
    seen = len(await runs(redis_client, namespace))

    async def new_leader_runs() -> bool:
        fresh = (await runs(redis_client, namespace))[seen:]
        return any(r["pid"] != old for r in fresh)

    took = await wait_for(new_leader_runs, 15, "another node to lead") - paused_at
    await asyncio.sleep(2)
    workers[old].cont()  # it wakes believing it still leads, with an old fence
    await asyncio.sleep(3)
    stop_all(processes)
    recorded = await runs(redis_client, namespace)
    report = await assert_each_fire_once(await observer_dist(make_dist, redis_url), recorded)
    before = recorded[seen - 1]
    takeover = next(r for r in recorded[seen:] if r["pid"] != old)
    assert before["pid"] == old and takeover["fence"] > before["fence"], (before, takeover)
    print(f"SIGSTOP takeover after {took:.2f}s (leader_ttl 2 s); {report}")


async def test_killed_leader_is_replaced_and_the_gap_is_in_history(
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
) -> None:
    workers = {w.pid: w for w in start_nodes(processes, redis_url, namespace, 3)}
    old = await leader_pid(redis_client, namespace)
    await asyncio.sleep(0.3)
    seen = len(await runs(redis_client, namespace))
    killed_at = time.monotonic()
    workers[old].kill()

    async def new_leader_runs() -> bool:
        fresh = (await runs(redis_client, namespace))[seen:]
        return any(r["pid"] != old for r in fresh)

    failover = await wait_for(new_leader_runs, 15, "a new leader") - killed_at
    await asyncio.sleep(2)
    stop_all(processes)
    recorded = await runs(redis_client, namespace)
    observer = await observer_dist(make_dist, redis_url)
    report = await assert_each_fire_once(observer, recorded)
    # The gap of a 2 s lease exceeds misfire_grace (1 s): the crontick job (skip)
    # records missed fires; tick (run_once) records missed ones and runs the newest.
    assert report["crontick"]["missed"] >= 1, report
    print(f"SIGKILL failover: first run by a new leader {failover:.2f}s after the kill; {report}")


async def test_graceful_stop_hands_over_and_the_next_fire_is_not_missed(
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
) -> None:
    workers = {w.pid: w for w in start_nodes(processes, redis_url, namespace, 3)}
    old = await leader_pid(redis_client, namespace)
    await asyncio.sleep(0.2)
    seen = len(await runs(redis_client, namespace))
    stopped_at = time.monotonic()
    workers[old].terminate()  # SIGTERM: the leader resigns in its lifespan shutdown

    async def new_leader_runs() -> bool:
        fresh = (await runs(redis_client, namespace))[seen:]
        return any(r["pid"] != old for r in fresh)

    handover = await wait_for(new_leader_runs, 15, "a new leader") - stopped_at
    await asyncio.sleep(1.5)
    stop_all(processes)
    recorded = await runs(redis_client, namespace)
    observer = await observer_dist(make_dist, redis_url)
    report = await assert_each_fire_once(observer, recorded)
    for job in JOBS:
        assert report[job]["missed"] == 0, report
    history = await observer.scheduler.history("tick", 50)
    lateness = [h["claimed_at"] - h["fire_ms"] for h in history if h["status"] == "succeeded"]
    print(
        f"graceful stop: first run on another node {handover:.2f}s after SIGTERM; "
        f"claim lateness max {max(lateness)} ms; {report}"
    )


async def test_broadcast_shards_across_live_nodes_and_any_spreads_load(
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
) -> None:
    env = {"REDIS_URL": redis_url, "NAMESPACE": namespace, "JOBS": "dispatch"}
    workers = processes.python(NODE, 3, env=env)
    pids = {w.pid for w in workers}

    async def all_three_shard() -> bool:
        return any(
            r["job"] == "everywhere" and r["shard"][1] == 3
            for r in await runs(redis_client, namespace)
        )

    await wait_for(all_three_shard, 20, "a broadcast over three nodes")
    await asyncio.sleep(2.2)
    stop_all(processes)
    recorded = await runs(redis_client, namespace)
    shards: dict[str, list[dict[str, Any]]] = {}
    for r in recorded:
        if r["job"] == "everywhere":
            shards.setdefault(r["fire_id"], []).append(r)
    full = [s for s in shards.values() if s[0]["shard"][1] == 3]
    assert len(full) >= 2, shards
    for fire in shards.values():
        total = fire[0]["shard"][1]
        # Each live member ran its own shard once: indexes 0..total-1, one per process.
        assert sorted(r["shard"][0] for r in fire) == list(range(len(fire)))
        assert len({r["pid"] for r in fire}) == len(fire) <= total
    for fire in full:
        assert {r["pid"] for r in fire} == pids
    anywhere = [r for r in recorded if r["job"] == "anywhere"]
    fire_ids = [r["fire_id"] for r in anywhere]
    assert len(fire_ids) == len(set(fire_ids)) >= 8, "a run_on='any' fire ran twice"
    spread = Counter(r["pid"] for r in anywhere)
    assert len(spread) >= 2, f"run_on='any' did not spread: {spread}"
    print(f"broadcast fires with 3 shards: {len(full)}; run_on='any' spread {dict(spread)}")


async def test_three_processes_on_postgresql_run_every_fire_exactly_once(
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
) -> None:
    env = {"REDIS_URL": redis_url, "NAMESPACE": namespace, "POSTGRES_DSN": postgres_dsn}
    processes.python(NODE, 3, env=env)  # election, claims and history all in PostgreSQL
    await leader_pid(redis_client, namespace)
    await asyncio.sleep(4)
    stop_all(processes)
    recorded = await runs(redis_client, namespace)
    observer = await observer_dist(make_dist, redis_url, postgres_dsn)
    report = await assert_each_fire_once(observer, recorded)
    for job in JOBS:
        assert report[job]["ran"] == report[job]["span"] >= 3, report
    print("postgresql steady state:", report)
