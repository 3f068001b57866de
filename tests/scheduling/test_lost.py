"""A fire recorded ``lost`` is never started again, and stays ``lost``.

A node that freezes (SIGSTOP, a long GC pause, a blocked event loop) past its fire's
run lease finds, when it wakes, that the leader recorded the fire lost: no attempt of
it may start then (the first after jitter or the wait for parents, nor a retry), a
running attempt is cancelled at its next renewal, and the run's final write leaves
the ``lost`` record alone.

In one process a blocked event loop (``time.sleep``) stands in for the freeze: no
renewal runs while it lasts.  The last test freezes a real leader process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.scheduling import JobContext
from asgi_dist.scheduling.jobs import Job, JobFunc, JobOptions
from asgi_dist.scheduling.runner import Fire, RunSettings, run_fire
from asgi_dist.scheduling.schedules import interval
from asgi_dist.scheduling.store import SchedulerStore
from tests.helpers.processes import ProcessGroup
from tests.scheduling.test_claim import claim, open_store
from tests.scheduling.test_cluster import NODE, observer_dist, runs, stop_all, wait_for
from tests.scheduling.test_redelivery import TIMING, confession, record
from tests.scheduling.workers import hang_once


async def runs_exist(client: aioredis.Redis, namespace: str) -> bool:
    return bool(await runs(client, namespace))


LEASE_MS = 300
FREEZE = 2 * LEASE_MS / 1000  # blocks the loop: the run lease lapses unrenewed

pytestmark = pytest.mark.parametrize("backend", ["redis", "postgres"])


async def claimed_fire(
    sched_dist: Any, backend: str, func: JobFunc, **options: Any
) -> tuple[Dist, SchedulerStore, Fire]:
    """A fire of job ``job`` claimed with a short run lease, ready for ``run_fire``."""
    store = await open_store(sched_dist, backend)
    fire_ms = await store.now_ms() - 5000
    fire_id = f"job:{fire_ms}"
    taken = claim(fire_ms, expected=None, advance=False, signature="", lease_ms=LEASE_MS)
    assert (await store.claim(taken)).status == "claimed"
    job = Job("job", func, interval(1), JobOptions(**options))
    dist = await sched_dist(start=False)  # only for the scheduler's own keepalive
    dist.scheduler._store = store
    fire = Fire(
        job=job,
        fire_ms=fire_ms,
        fire_id=fire_id,
        fence=1,
        node_id="node-a",
        leased=False,
        keepalive=dist.scheduler._keepalive(job, fire_id, LEASE_MS),
    )
    return dist, store, fire


SETTINGS = RunSettings(lease_ms=LEASE_MS, backoff_base=0.01, backoff_max=0.01, dependency_wait=5)


async def test_a_retry_after_the_run_lease_lapsed_is_not_started(
    sched_dist: Any, backend: str
) -> None:
    attempts: list[int] = []

    async def flaky(ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        time.sleep(FREEZE)  # noqa: ASYNC251 (the freeze under test)
        raise RuntimeError("fails once awake")

    _, store, fire = await claimed_fire(sched_dist, backend, flaky, retries=2)
    run = asyncio.create_task(run_fire(store, fire, SETTINGS))
    await asyncio.wait({run}, timeout=10)
    assert run.done()
    assert attempts == [1], attempts
    rec = await store.record("job", fire.fire_id)
    assert rec is not None and rec["status"] == "lost", rec
    assert "not started again" in rec["error"], rec


async def test_a_child_whose_lease_lapsed_while_waiting_for_its_parent_is_not_started(
    sched_dist: Any, backend: str
) -> None:
    started: list[str] = []

    async def child(ctx: JobContext) -> None:
        started.append(ctx.fire_id)

    _, store, fire = await claimed_fire(sched_dist, backend, child, after=("parent",))
    suffix = fire.fire_id.rpartition(":")[2]
    parent = claim(
        fire.fire_ms, job="parent", fire_id=f"parent:{suffix}", expected=None,
        advance=False, signature="",
    )  # fmt: skip
    assert (await store.claim(parent)).status == "claimed"
    run = asyncio.create_task(run_fire(store, fire, SETTINGS))
    await asyncio.sleep(0.1)  # the child polls for its parent, renewing its lease
    time.sleep(FREEZE)  # noqa: ASYNC251 (the node freezes while the child waits)
    await store.finish("parent", f"parent:{suffix}", {"status": "succeeded"}, release=False)
    await asyncio.wait({run}, timeout=10)
    assert run.done()
    assert started == []
    rec = await store.record("job", fire.fire_id)
    assert rec is not None and rec["status"] == "lost", rec


async def test_a_running_attempt_found_lost_at_its_renewal_is_cancelled(
    sched_dist: Any, backend: str
) -> None:
    finished: list[str] = []

    async def slow(ctx: JobContext) -> None:
        time.sleep(FREEZE)  # noqa: ASYNC251 (frozen mid-run, past the lease)
        await asyncio.sleep(5)
        finished.append(ctx.fire_id)

    _, store, fire = await claimed_fire(sched_dist, backend, slow)
    run = asyncio.create_task(run_fire(store, fire, SETTINGS))
    await asyncio.wait({run}, timeout=10)
    assert run.cancelled()
    assert finished == []
    rec = await store.record("job", fire.fire_id)
    assert rec is not None and rec["status"] == "lost", rec


async def test_the_final_write_of_a_run_leaves_a_lost_record_alone(
    sched_dist: Any, backend: str
) -> None:
    store = await open_store(sched_dist, backend)
    fire_ms = await store.now_ms() - 5000
    fire_id = f"job:{fire_ms}"
    taken = claim(fire_ms, expected=None, advance=False, signature="", lease_ms=200)
    assert (await store.claim(taken)).status == "claimed"
    await asyncio.sleep(0.4)
    assert await store.reap_lost("job") == [fire_id]
    written = await store.finish("job", fire_id, {"status": "succeeded"}, release=True)
    assert not written
    assert not await store.keep_running("job", fire_id, 1000, attempt=2, node="late")
    rec = await store.record("job", fire_id)
    assert rec is not None and rec["status"] == "lost", rec


async def test_a_frozen_leader_that_wakes_starts_no_retry_of_its_lost_fire(
    backend: str,
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
    request: pytest.FixtureRequest,
) -> None:
    env = {"REDIS_URL": redis_url, "NAMESPACE": namespace, "JOBS": "redeliver", **TIMING}
    env.update(RUN_ON="leader", RETRIES="2")
    postgres = None
    if backend == "postgres":
        postgres = env["POSTGRES_DSN"] = request.getfixturevalue("postgres_dsn")
    # Alone, the victim leads; its first run freezes it (SIGSTOP) and fails once woken.
    (victim,) = processes.python(NODE, 1, env={**env, "VICTIM": "freeze"})
    held = await confession(redis_client, namespace)
    fire_id = held["fire_id"]
    processes.python(NODE, 2, env=env)
    observer = await observer_dist(make_dist, redis_url, postgres)

    async def lost() -> bool:
        rec = await record(observer, fire_id)
        return rec is not None and rec["status"] == "lost"

    await wait_for(lost, 20, f"{fire_id} to be recorded lost")
    victim.cont()  # wakes: attempt 1 fails, and a retry would be due

    async def later_runs() -> bool:
        recorded = await runs(redis_client, namespace)
        return len({r["fire_id"] for r in recorded if r["pid"] != victim.pid}) >= 4

    await wait_for(later_runs, 20, "the healthy nodes to run later fires")
    await asyncio.sleep(1.0)  # a retry backs off at most retry_backoff (0.5 s)
    stop_all(processes)
    starts = [r for r in await runs(redis_client, namespace) if r["fire_id"] == fire_id]
    assert [(r["pid"], r["attempt"]) for r in starts] == [(victim.pid, 1)], starts
    rec = await record(observer, fire_id)
    assert rec is not None and rec["status"] == "lost" and rec["node"] == held["node"], rec
    print(f"{fire_id}: leader frozen mid-run, woke to a lost fire and retried nothing")


async def test_a_one_off_whose_leader_died_running_it_is_recorded_lost(
    backend: str,
    processes: ProcessGroup,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    make_dist: Any,
    request: pytest.FixtureRequest,
) -> None:
    """The new leader knows no job by a one-off's name: it must still reap its fire."""
    env = {"REDIS_URL": redis_url, "NAMESPACE": namespace, **TIMING}
    postgres = None
    if backend == "postgres":
        postgres = env["POSTGRES_DSN"] = request.getfixturevalue("postgres_dsn")
    (victim,) = processes.python(NODE, 1, env=env)  # alone: it leads
    await wait_for(lambda: runs_exist(redis_client, namespace), 20, "the victim to lead")
    processes.python(NODE, 2, env=env)
    observer = await observer_dist(make_dist, redis_url, postgres)
    fire_id = await observer.scheduler.at(0.0, hang_once, name="hang")
    held = await confession(redis_client, namespace)
    assert held["fire_id"] == fire_id and held["pid"] == victim.pid, held
    victim.kill()  # SIGKILL the leader mid-run: another node leads

    async def lost() -> bool:
        rec = await observer.scheduler.store.record("hang", fire_id)
        return rec is not None and rec["status"] == "lost"

    await wait_for(lost, 20, f"one-off {fire_id} to be recorded lost")
    stop_all(processes)
