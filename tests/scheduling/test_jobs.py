"""Job behaviour on one node: retries, timeouts, overlap, dependencies, operations, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import pytest

from asgi_dist import Dist, LockLost
from asgi_dist.scheduling import JobContext, SchedulerConfig
from asgi_dist.scheduling.jobs import Job, JobOptions
from asgi_dist.scheduling.policies import jitter_cap_ms, runnable
from asgi_dist.scheduling.schedules import interval
from asgi_dist.scheduling.store_memory import MemoryStore
from asgi_dist.scheduling.store_postgres import PostgresStore
from asgi_dist.scheduling.store_redis import RedisStore

NEVER = "0 0 1 1 *"  # once a year: these jobs run when triggered
ONE_OFF_RUNS: dict[str, list[JobContext]] = defaultdict(list)


async def one_off(ctx: JobContext) -> None:
    ONE_OFF_RUNS[ctx.payload["key"]].append(ctx)


async def settle(dist: Dist, job: str, fire_id: str, within: float = 10.0) -> dict[str, Any]:
    """The final history record of ``fire_id`` (bounded wait)."""
    final = {"succeeded", "failed", "cancelled", "skipped", "missed", "paused"}
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for record in await dist.scheduler.history(job, 100):
            if record["fire_id"] == fire_id and record["status"] in final:
                return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"{fire_id} did not finish within {within}s")


async def leading(dist: Dist, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not dist.scheduler.leading:
        assert time.monotonic() < deadline, "the scheduler did not lead"
        await asyncio.sleep(0.01)


async def test_retries_back_off_and_record_the_attempt(sched_dist: Any) -> None:
    attempts: list[tuple[int, float]] = []
    dist = await sched_dist(start=False, scheduler=SchedulerConfig(retry_backoff=0.05))

    @dist.cron(NEVER, retries=3)
    async def flaky(ctx: JobContext) -> None:
        attempts.append((ctx.attempt, time.monotonic()))
        if ctx.attempt < 3:
            raise RuntimeError(f"transient failure {ctx.attempt}")

    await dist.start()
    await leading(dist)
    record = await settle(dist, "flaky", await dist.scheduler.trigger("flaky"))
    assert [a for a, _ in attempts] == [1, 2, 3]
    assert record["status"] == "succeeded" and record["attempt"] == 3
    assert record["error"] is None


async def test_a_run_past_its_timeout_fails_with_a_clear_error(sched_dist: Any) -> None:
    dist = await sched_dist(start=False)

    @dist.cron(NEVER, timeout=0.1)
    async def slow(ctx: JobContext) -> None:
        await asyncio.sleep(30)

    await dist.start()
    await leading(dist)
    record = await settle(dist, "slow", await dist.scheduler.trigger("slow"))
    assert record["status"] == "failed"
    assert "timed out after 0.1s" in record["error"]


@pytest.mark.parametrize("bound", [None, 30.0])
async def test_a_timeout_error_raised_by_the_job_is_a_failure_that_is_retried(
    sched_dist: Any, bound: float | None
) -> None:
    """Not the job's own timeout: without one, the run broke (no retry, error None)."""
    attempts: list[int] = []
    config = SchedulerConfig(retry_backoff=0.01)
    dist = await sched_dist(start=False, scheduler=config)

    @dist.cron(NEVER, retries=2, timeout=bound)
    async def upstream(ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        raise TimeoutError("the upstream API did not answer")

    await dist.start()
    await leading(dist)
    record = await settle(dist, "upstream", await dist.scheduler.trigger("upstream"))
    assert attempts == [1, 2, 3]
    assert record["status"] == "failed" and record["attempt"] == 3, record
    assert record["error"] == "attempt 3: TimeoutError: the upstream API did not answer"


async def test_overlap_forbid_skips_a_fire_while_the_previous_runs(sched_dist: Any) -> None:
    release = asyncio.Event()
    dist = await sched_dist(start=False)

    @dist.cron(NEVER, overlap="forbid")
    async def exclusive(ctx: JobContext) -> None:
        await release.wait()

    await dist.start()
    await leading(dist)
    first = await dist.scheduler.trigger("exclusive")
    await asyncio.sleep(0.2)
    second = await dist.scheduler.trigger("exclusive")
    skipped = await settle(dist, "exclusive", second)
    release.set()
    assert skipped["status"] == "skipped" and "overlap" in skipped["error"]
    assert (await settle(dist, "exclusive", first))["status"] == "succeeded"


async def test_overlap_replace_cancels_the_previous_run(sched_dist: Any) -> None:
    started: list[str] = []
    dist = await sched_dist(start=False)

    @dist.cron(NEVER, overlap="replace")
    async def latest(ctx: JobContext) -> None:
        started.append(ctx.fire_id)
        if len(started) == 1:
            await asyncio.sleep(30)

    await dist.start()
    await leading(dist)
    first = await dist.scheduler.trigger("latest")
    await asyncio.sleep(0.2)
    second = await dist.scheduler.trigger("latest")
    assert (await settle(dist, "latest", first))["status"] == "cancelled"
    assert (await settle(dist, "latest", second))["status"] == "succeeded"
    assert started == [first, second]


async def test_child_runs_after_its_parent_succeeded_for_the_same_fire(sched_dist: Any) -> None:
    finished: dict[str, float] = {}
    child_started: dict[str, float] = {}
    dist = await sched_dist(start=False)

    @dist.every(seconds=0.5)
    async def parent(ctx: JobContext) -> None:
        await asyncio.sleep(0.05)
        if ctx.fire_time.microsecond:  # fails on the half seconds
            raise RuntimeError("parent failed")
        finished[ctx.fire_id.rpartition(":")[2]] = time.monotonic()

    @dist.every(seconds=0.5, after=["parent"])
    async def child(ctx: JobContext) -> None:
        child_started[ctx.fire_id.rpartition(":")[2]] = time.monotonic()

    await dist.start()
    deadline = time.monotonic() + 10
    while len(child_started) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.6)
    for fire, at in child_started.items():
        assert fire in finished and finished[fire] <= at  # only after the parent's success
    skipped = [h for h in await dist.scheduler.history("child", 20) if h["status"] == "skipped"]
    assert skipped and all("parent 'parent'" in h["error"] for h in skipped)
    assert all(int(h["fire_ms"]) % 1000 == 500 for h in skipped)


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_a_job_with_parents_runs_when_triggered_by_hand(
    sched_dist: Any, backend: str
) -> None:
    # A trigger is outside the schedule: no parent has a fire to follow.
    ran: list[str] = []
    servers = {"redis": {}, "postgres": {"redis": None}}[backend]
    dist = await sched_dist(start=False, **servers)

    @dist.cron(NEVER)
    async def parent(ctx: JobContext) -> None:
        ran.append(ctx.job)

    @dist.cron(NEVER, after=["parent"])
    async def child(ctx: JobContext) -> None:
        ran.append(ctx.job)

    await dist.start()
    await leading(dist)
    record = await settle(dist, "child", await dist.scheduler.trigger("child"))
    assert record["status"] == "succeeded", record
    assert ran == ["child"]


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_history_returns_at_most_history_limit_records(sched_dist: Any, backend: str) -> None:
    servers = {"redis": {}, "postgres": {"redis": None}}[backend]
    dist = await sched_dist(start=False, scheduler=SchedulerConfig(history_limit=3), **servers)

    @dist.cron(NEVER)
    async def often(ctx: JobContext) -> None:
        return None

    await dist.start()
    await leading(dist)
    fires = []
    for _ in range(6):
        fires.append(await dist.scheduler.trigger("often"))
        await settle(dist, "often", fires[-1])
    history = await dist.scheduler.history("often", 100)
    assert [h["fire_id"] for h in history] == fires[:-4:-1]  # the newest three


async def test_pause_resume_and_trigger_from_a_node_that_does_not_lead(
    sched_dist: Any,
) -> None:
    runs: list[JobContext] = []
    leader = await sched_dist(start=False)
    operator = await sched_dist(start=False, scheduler=SchedulerConfig(enabled=False))
    for dist in (leader, operator):

        @dist.every(seconds=0.2, name="beat")
        async def beat(ctx: JobContext) -> None:
            runs.append(ctx)

    await leader.start()
    await operator.start()
    await leading(leader)
    await operator.scheduler.pause("beat")
    await asyncio.sleep(0.3)  # a fire in flight may still finish
    count = len(runs)
    await asyncio.sleep(0.7)
    assert len(runs) == count, "a paused job started"
    history = await operator.scheduler.history("beat", 5)
    assert history[0]["status"] == "paused"  # paused fires are recorded, not dropped
    assert [j["paused"] for j in await operator.scheduler.jobs()] == [True]
    fire_id = await operator.scheduler.trigger("beat")
    assert (await settle(operator, "beat", fire_id))["status"] == "paused"
    await operator.scheduler.resume("beat")
    fire_id = await operator.scheduler.trigger("beat", payload={"by": "operator"})
    record = await settle(operator, "beat", fire_id)
    assert record["status"] == "succeeded" and record["node"] == leader.node_id
    assert any(r.fire_id == fire_id and r.payload == {"by": "operator"} for r in runs)


async def test_one_off_runs_once_at_its_time(sched_dist: Any) -> None:
    dist = await sched_dist()
    await leading(dist)
    key = dist.namespace
    fire_id = await dist.scheduler.at(0.3, one_off, name="once", payload={"key": key})
    record = await settle(dist, "once", fire_id)
    assert record["status"] == "succeeded" and record["kind"] == "once"
    assert [c.fire_id for c in ONE_OFF_RUNS[key]] == [fire_id]
    assert record["started_at"] >= record["fire_ms"]


async def test_a_one_off_the_leader_cannot_import_is_recorded_failed(sched_dist: Any) -> None:
    dist = await sched_dist()
    await leading(dist)
    # Queued by a node whose deployment has a module this leader lacks.
    now = await dist.scheduler.store.now_ms()
    fire_id = f"reminder:{now}:once-abc123"
    entry = {
        "job": "reminder",
        "func": "tests.scheduling.not_deployed_here:reminder",
        "fire_ms": now,
        "fire_id": fire_id,
        "payload": None,
        "retries": 0,
        "timeout": None,
    }
    await dist.scheduler.store.add_once(entry, now)
    record = await settle(dist, "reminder", fire_id)
    assert record["status"] == "failed" and record["kind"] == "once", record
    assert "tests.scheduling.not_deployed_here:reminder" in record["error"], record
    assert "ModuleNotFoundError" in record["error"] and "deploy" in record["error"], record
    assert await dist.scheduler.store.due_once(now, 10) == []


async def test_a_trigger_of_a_job_the_leader_lacks_is_recorded_failed(sched_dist: Any) -> None:
    dist = await sched_dist()
    await leading(dist)
    # Triggered from a node whose deployment has a job this leader lacks.
    now = await dist.scheduler.store.now_ms()
    fire_id = f"newjob:{now}:trigger-abc123"
    entry = {"job": "newjob", "fire_ms": now, "fire_id": fire_id, "payload": None}
    # A malformed entry (another version's) is dropped, not retried by every pass.
    await dist.scheduler.store.push_trigger({"job": "newjob", "fire_id": "newjob:x"})
    await dist.scheduler.store.push_trigger(entry)
    record = await settle(dist, "newjob", fire_id)
    assert record["status"] == "failed" and record["kind"] == "trigger", record
    assert "'newjob' is not registered on leader" in record["error"], record
    assert await dist.scheduler.store.due_triggers(10) == []


async def test_shutdown_cancels_running_jobs_after_the_grace_and_records_it(
    sched_dist: Any,
) -> None:
    started = asyncio.Event()
    dist = await sched_dist(start=False, scheduler=SchedulerConfig(shutdown_grace=0.2))
    observer = await sched_dist(start=False, scheduler=SchedulerConfig(enabled=False))

    @dist.cron(NEVER)
    async def endless(ctx: JobContext) -> None:
        started.set()
        await asyncio.sleep(30)

    await dist.start()
    await observer.start()
    await leading(dist)
    fire_id = await dist.scheduler.trigger("endless")
    await asyncio.wait_for(started.wait(), 10)
    await dist.stop()
    record = await settle(observer, "endless", fire_id)
    assert record["status"] == "cancelled"


@pytest.mark.parametrize("backend", ["postgres", "memory"])
async def test_every_backend_runs_interval_fires_in_sequence(sched_dist: Any, backend: str) -> None:
    seen: list[str] = []
    extra: dict[str, Any] = {"redis": None}  # postgres alone, or nothing: the memory backend
    if backend == "memory":
        extra["postgres"] = None
    dist = await sched_dist(start=False, **extra)

    @dist.every(seconds=0.2)
    async def quick(ctx: JobContext) -> None:
        seen.append(ctx.fire_id)

    await dist.start()
    deadline = time.monotonic() + 10
    while len(seen) < 4:
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.02)
    fires = [int(f.rpartition(":")[2]) for f in seen]
    assert fires == list(range(fires[0], fires[0] + 200 * len(fires), 200))
    assert len(await dist.scheduler.history("quick", 10)) >= 4


def test_misfire_policies_decide_which_late_fires_still_run() -> None:
    async def noop(ctx: JobContext) -> None:
        return None

    def job(misfire: Any) -> Job:
        return Job("j", noop, interval(1), JobOptions(misfire=misfire, misfire_grace=1.5))

    fires, now = [1000, 2000, 3000, 4000, 5000], 5500
    assert runnable(job("skip"), fires, now, 6000, 10) == {4000, 5000}
    assert runnable(job("run_once"), fires, now, 6000, 10) == {3000, 4000, 5000}
    assert runnable(job("run_all"), fires, now, 6000, 2) == {2000, 3000, 4000, 5000}
    # More late fires beyond this bounded batch: the batch's late ones are all missed.
    assert runnable(job("run_once"), fires[:2], now, 3000, 10) == set()


async def test_scheduler_runs_on_redis_cluster(sched_dist: Any, cluster_url: str) -> None:
    seen: list[str] = []
    dist = await sched_dist(start=False, redis=cluster_url, postgres=None)

    @dist.every(seconds=0.2)
    async def clustered(ctx: JobContext) -> None:
        seen.append(ctx.fire_id)

    await dist.start()
    await leading(dist)
    fire_id = await dist.scheduler.trigger("clustered")
    assert (await settle(dist, "clustered", fire_id))["status"] == "succeeded"
    deadline = time.monotonic() + 10
    while len([f for f in seen if "trigger" not in f]) < 3:
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.02)
    scheduled = [int(f.rpartition(":")[2]) for f in seen if "trigger" not in f]
    assert scheduled == list(range(scheduled[0], scheduled[0] + 200 * len(scheduled), 200))


def test_jitter_is_capped_below_the_next_fire() -> None:
    async def noop(ctx: JobContext) -> None:
        return None

    def cap(seconds: float, jitter: float) -> int:
        job = Job("j", noop, interval(seconds), JobOptions(jitter=jitter))
        return jitter_cap_ms(job, 0)

    assert cap(0.2, 10.0) == 180  # 90% of the period
    assert cap(60, 5.0) == 5000
    assert cap(60, 0) == 0


async def test_jittered_fires_still_run_once_each(sched_dist: Any) -> None:
    seen: list[str] = []
    dist = await sched_dist(start=False, redis=None, postgres=None)

    @dist.every(seconds=0.2, jitter=10.0)
    async def jittered(ctx: JobContext) -> None:
        seen.append(ctx.fire_id)

    await dist.start()
    deadline = time.monotonic() + 10
    while len(seen) < 5:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert len(set(seen)) == len(seen)


async def test_scheduler_survives_a_redis_restart_and_resumes(
    sched_dist: Any, redis_server: Any
) -> None:
    seen: list[str] = []
    dist = await sched_dist(start=False, redis=redis_server.url, postgres=None)

    @dist.every(seconds=0.2)
    async def steady(ctx: JobContext) -> None:
        seen.append(ctx.fire_id)

    await dist.start()

    async def runs_after(count: int) -> None:
        deadline = time.monotonic() + 20
        while len(seen) < count:
            assert time.monotonic() < deadline, f"no runs after the restart: {seen[-3:]}"
            await asyncio.sleep(0.05)

    await runs_after(3)
    redis_server.kill()  # an empty server comes back: every key is gone
    await asyncio.sleep(1.0)
    before = len(seen)
    redis_server.start()
    await runs_after(before + 3)
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_one_off_names_are_not_tracked_after_their_runs(
    sched_dist: Any, backend: str
) -> None:
    """Names given to at() may be countless: the leader stops reaping one once its
    runs are over, instead of one more round trip per recovery pass for good."""
    dist = await sched_dist(scheduler=SchedulerConfig(backend=backend, running_lease=1.0))
    await leading(dist)
    key = dist.namespace
    ids = [
        await dist.scheduler.at(0.1, one_off, name=f"once-{i}", payload={"key": key})
        for i in range(5)
    ]
    for i, fire_id in enumerate(ids):
        assert (await settle(dist, f"once-{i}", fire_id))["status"] == "succeeded"
    registered = {j.name for j in dist.scheduler.registry}
    for _ in range(40):  # recovery passes every running_lease / 2
        if dist.scheduler._tracked <= registered:
            break
        await asyncio.sleep(0.1)
    assert dist.scheduler._tracked <= registered
    assert await dist.scheduler.store.one_off_names() == {}  # the next leader's list too


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_triggers_and_one_offs_run_with_the_shortest_claim_ttl(
    sched_dist: Any, backend: str
) -> None:
    """claim_ttl=0 is in its documented range: a trigger's claim must still work (Redis
    refused the zero expiry, and the leader lost the trigger and crash-looped)."""
    config = SchedulerConfig(backend=backend, claim_ttl=0.0)
    extra: dict[str, Any] = {"redis": None, "postgres": None} if backend == "memory" else {}
    dist = await sched_dist(start=False, scheduler=config, **extra)

    @dist.cron(NEVER)
    async def manual(ctx: JobContext) -> None: ...

    await dist.start()
    await leading(dist)
    fire_id = await dist.scheduler.trigger("manual")
    assert (await settle(dist, "manual", fire_id))["status"] == "succeeded"
    key = dist.namespace
    once = await dist.scheduler.at(0.0, one_off, name="once", payload={"key": key})
    assert (await settle(dist, "once", once))["status"] == "succeeded"


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_a_trigger_survives_a_failed_claim_and_runs_once(
    sched_dist: Any, backend: str
) -> None:
    """The leader read the trigger, then its claim failed (the store unreachable for a
    moment): the trigger was already gone from the queue, and never ran nor recorded."""
    runs: list[str] = []
    extra: dict[str, Any] = {"redis": None, "postgres": None} if backend == "memory" else {}
    dist = await sched_dist(start=False, scheduler=SchedulerConfig(backend=backend), **extra)

    @dist.cron(NEVER)
    async def manual(ctx: JobContext) -> None:
        runs.append(ctx.fire_id)

    await dist.start()
    await leading(dist)
    store = dist.scheduler.store
    claim, failed = store.claim, []

    async def fails_once(taken: Any) -> Any:
        if taken.job == "manual" and not failed:
            failed.append(taken.fire_id)
            raise ConnectionError("the store is unreachable for a moment")
        return await claim(taken)

    store.claim = fails_once  # type: ignore[method-assign]
    fire_id = await dist.scheduler.trigger("manual")
    record = await settle(dist, "manual", fire_id, within=15)
    assert failed == [fire_id] and runs == [fire_id], (failed, runs)
    assert record["status"] == "succeeded"
    assert await store.due_triggers(10) == []


async def traces(dist: Dist, job: str) -> int:
    """How many things the store still keeps under the name ``job``."""
    store = dist.scheduler.store
    if isinstance(store, RedisStore):
        keys = [store.job_key(job, s) for s in ("state", "hist", "hidx", "active")]
        return int(await store.client.exists(*keys))
    if isinstance(store, PostgresStore):
        return int(
            await store.pool.fetchval(
                f"SELECT (SELECT count(*) FROM {store.fires} WHERE job = $1)"
                f" + (SELECT count(*) FROM {store.jobs} WHERE job = $1)",
                job,
            )
        )
    assert isinstance(store, MemoryStore)
    return int(job in store._jobs)


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_a_one_off_name_is_forgotten_once_its_retention_passed(
    sched_dist: Any, backend: str
) -> None:
    """at() names may be countless: a name no job is registered under keeps its state
    and history for one_off_retention after its last run, then the store forgets it; a
    registered job's name used by a one-off is kept for good."""
    config = SchedulerConfig(
        backend=backend, running_lease=1.0, one_off_retention=1.0, claim_ttl=0.0
    )
    extra: dict[str, Any] = {"redis": None, "postgres": None} if backend == "memory" else {}
    dist = await sched_dist(start=False, scheduler=config, **extra)

    @dist.cron(NEVER)
    async def kept(ctx: JobContext) -> None: ...

    await dist.start()
    await leading(dist)
    key = dist.namespace
    retired = await dist.scheduler.at(0.0, one_off, name="retired", payload={"key": key})
    named = await dist.scheduler.at(0.0, one_off, name="kept", payload={"key": key})
    assert (await settle(dist, "retired", retired))["status"] == "succeeded"
    assert (await settle(dist, "kept", named))["status"] == "succeeded"
    # Within the retention its history is there, as documented.
    assert [h["fire_id"] for h in await dist.scheduler.history("retired")] == [retired]
    deadline = time.monotonic() + 15
    while await traces(dist, "retired"):
        assert time.monotonic() < deadline, "the retired one-off name was never forgotten"
        await asyncio.sleep(0.2)
        if backend == "memory":  # one process: the next one-off's claim sweeps
            await dist.scheduler.at(0.0, one_off, name="sweeper", payload={"key": key})
    assert await dist.scheduler.history("retired") == []
    assert [h["fire_id"] for h in await dist.scheduler.history("kept")] == [named]
    assert await traces(dist, "kept")
    # The name can be used again.
    again = await dist.scheduler.at(0.0, one_off, name="retired", payload={"key": key})
    assert (await settle(dist, "retired", again))["status"] == "succeeded"
    # A job registered later under a one-off's name keeps its state for good.
    store = dist.scheduler.store
    state = await store.init_job("retired", "sig", 10**13)
    await asyncio.sleep(2.5)  # past the retention
    if backend == "memory":
        await dist.scheduler.at(0.0, one_off, name="sweeper", payload={"key": key})
    await store.forget_retired()
    assert await store.state("retired") == state


async def test_a_recovery_task_that_swallows_its_cancellation_does_not_stall_the_leader(
    sched_dist: Any,
) -> None:
    """A client library may swallow a cancellation (redis-py did, while Redis restarted
    under load): the term must still end, and the next one claim fires."""
    dist = await sched_dist(start=False, scheduler=SchedulerConfig(running_lease=1.0))

    @dist.cron(NEVER)
    async def idle(ctx: JobContext) -> None: ...  # the recovery task reaps its runs

    await dist.start()
    await leading(dist)
    store = dist.scheduler.store
    reap, now_ms = store.reap_lost, store.now_ms
    failures = {"now": 0}

    async def stubborn_reap(job: str, limit: int = 1000, members: Any = None) -> list[str]:
        try:
            await asyncio.sleep(10)  # where the cancellation finds it
        except asyncio.CancelledError:
            return []  # swallowed, as a buggy client would
        return list(await reap(job, limit, members))

    async def failing_once(*args: Any) -> int:
        if failures["now"] == 0:
            failures["now"] += 1
            # The term ends (a backend error alone no longer ends it).
            raise LockLost("the term was lost while Redis restarted")
        return int(await now_ms(*args))

    store.reap_lost = stubborn_reap  # type: ignore[method-assign]
    await asyncio.sleep(0.7)  # the recovery task is running its passes
    terms = dist.scheduler.terms
    store.now_ms = failing_once  # type: ignore[method-assign]
    deadline = time.monotonic() + 15
    while dist.scheduler.terms == terms or not dist.scheduler.leading:
        assert time.monotonic() < deadline, "the leader stalled after its term ended"
        await asyncio.sleep(0.05)
