"""Check-back and purge are cluster jobs: one node runs each fire, through the scheduler."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig
from asgi_dist.transactions import TransactionConfig
from asgi_dist.transactions.service import CHECKBACK_JOB, PURGE_JOB
from tests.helpers.processes import ProcessGroup
from tests.transactions import payments
from tests.transactions.settings import FAST
from tests.transactions.waiting import eventually
from tests.transactions.workers import WORKER


async def count(pg: asyncpg.Connection, sql: str) -> int:
    n: int = await pg.fetchval(sql)
    return n


@pytest.fixture
async def orders(pg: asyncpg.Connection, namespace: str, postgres_dsn: str) -> str:
    await pg.execute(f"CREATE TABLE {namespace}_orders (id int PRIMARY KEY)")
    payments.configure(postgres_dsn, namespace)
    return f"{namespace}_orders"


async def test_check_back_and_purge_are_registered_as_scheduler_jobs(
    fast_dist: Callable[..., Any],
) -> None:
    dist: Dist = await fast_dist(sessions=False)
    assert dist.transactions.scheduled
    jobs = {j["name"]: j for j in await dist.scheduler.jobs()}
    assert set(jobs) == {CHECKBACK_JOB, PURGE_JOB}
    assert all(j["overlap"] == "forbid" for j in jobs.values())
    assert all(j["run_on"] == "leader" for j in jobs.values())


async def test_the_purge_job_deletes_published_rows_past_retention(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, orders: str
) -> None:
    dist: Dist = await fast_dist(sessions=False, transactions=replace(FAST, retention=0.05))
    table = f"{dist.namespace}_outbox"
    async with dist.transactional_message("payments.done", {"order": 1}, check=payments.check):
        pass

    async def published() -> bool:
        # Past its retention by the server clock, which the purge compares with.
        sql = f"SELECT count(*) FROM {table} WHERE published_at < now() - interval '0.1 s'"
        return await count(pg, sql) == 1

    await eventually(published, 10, "message published and past its retention")
    # purge_interval is a minute: only the triggered fire can have purged it.
    fire_id = await dist.scheduler.trigger(PURGE_JOB)

    async def purged() -> bool:
        history = await dist.scheduler.history(PURGE_JOB, 20)
        done = [h for h in history if h["fire_id"] == fire_id and h["status"] == "succeeded"]
        return bool(done) and await count(pg, f"SELECT count(*) FROM {table}") == 0

    await eventually(purged, 10, "purge fire succeeded and the row is gone")


async def test_with_the_scheduler_off_check_back_runs_in_the_process(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, orders: str
) -> None:
    dist: Dist = await fast_dist(sessions=False, scheduler=SchedulerConfig(enabled=False))
    assert not dist.transactions.scheduled
    assert await dist.scheduler.jobs() == []
    message = dist.transactional_message(
        "payments.done", {"order": 5}, check=payments.check, check_after=0.2
    )
    # Entered and never exited: the half row is left as a dead process leaves it.
    await message.__aenter__()
    await pg.execute(payments.insert_order(), 5)
    table = f"{dist.namespace}_outbox"

    async def committed() -> bool:
        return await count(pg, f"SELECT count(*) FROM {table} WHERE state = 0") == 1

    await eventually(committed, 10, "check-back committed the half message")


async def test_check_back_of_a_dead_process_survives_its_leader_and_runs_once_per_fire(
    make_dist: Callable[..., Any],
    pg: asyncpg.Connection,
    orders: str,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    env = {
        "ASGI_DIST_REDIS_URL": redis_url,
        "ASGI_DIST_POSTGRES_DSN": postgres_dsn,
        "ASGI_DIST_NAMESPACE": namespace,
        "WORKER_STATE": str(tmp_path),
    }
    checkers = processes.python(WORKER, 2, env, args=["checker"])
    reports = [tmp_path / f"checker-{i}.json" for i in range(2)]
    # Reads the scheduler's history; runs no job and no transaction worker itself.
    observer: Dist = await make_dist(
        sessions=False,
        transactions=TransactionConfig(enabled=False),
        scheduler=SchedulerConfig(enabled=False),
    )

    def read() -> list[dict[str, Any]]:
        return [json.loads(r.read_text()) for r in reports]

    async def newest_node() -> str | None:
        history = await observer.scheduler.history(CHECKBACK_JOB, 1)
        return history[0]["node"] if history else None

    async def a_checker_runs_the_job() -> bool:
        if not all(r.exists() for r in reports):
            return False
        return await newest_node() in {r["node"] for r in read()}

    try:
        await eventually(a_checker_runs_the_job, 30, "two checkers started, one leading")
    except AssertionError:
        raise AssertionError("\n".join(w.output() for w in checkers)) from None
    # A third process dies after its local commit, before making the message visible.
    (half,) = processes.python(WORKER, 1, env, args=["half", "after-commit"])
    inside = tmp_path / "inside"

    async def is_inside() -> bool:
        return inside.exists() and bool(inside.read_text())

    try:
        await eventually(is_inside, 30, "worker inside the transactional message")
    except AssertionError:
        raise AssertionError(half.output()) from None
    # The checker that runs the job dies with it: the other must take the job over.
    leader = await newest_node()
    nodes = [r["node"] for r in read()]
    (dead,) = [i for i, node in enumerate(nodes) if node == leader]
    survivor = 1 - dead
    half.kill()
    checkers[dead].kill()
    table = f"{namespace}_outbox"
    assert await count(pg, f"SELECT count(*) FROM {table} WHERE state = 1") == 1

    async def resolved() -> bool:
        return read()[survivor]["resolved"]["commit"] == 1

    await eventually(resolved, 20, "the surviving checker committed the dead process's message")
    assert await count(pg, f"SELECT count(*) FROM {table} WHERE state = 0") == 1
    assert sum(sum(r["resolved"].values()) for r in read()) == 1  # decided once, by one node

    # One run per fire: no fire id ran on both checkers, and the history holds each
    # fire once, with the node that ran it.
    reports_now = read()
    fires = [set(r["fires"]) for r in reports_now]
    assert fires[dead] and fires[survivor], "each checker ran the job in its turn"
    assert fires[0].isdisjoint(fires[1]), "a fire ran on both checkers"
    history = await observer.scheduler.history(CHECKBACK_JOB, 1000)
    ids = [h["fire_id"] for h in history]
    assert len(ids) == len(set(ids)), "a fire is recorded twice"
    by_fire = {h["fire_id"]: h["node"] for h in history}
    for report in reports_now:
        for fire_id in report["fires"]:
            if fire_id in by_fire:  # the history keeps the newest 1000
                assert by_fire[fire_id] == report["node"]


async def test_check_back_runs_as_a_job_on_the_postgres_scheduler(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, orders: str
) -> None:
    dist: Dist = await fast_dist(redis=None, sessions=False)  # the scheduler's store: PostgreSQL
    assert dist.transactions.scheduled
    message = dist.transactional_message(
        "payments.done", {"order": 6}, check=payments.check, check_after=0.2
    )
    await message.__aenter__()  # never exited, as by a dead process
    await pg.execute(payments.insert_order(), 6)
    table = f"{dist.namespace}_outbox"

    async def committed() -> bool:
        return await count(pg, f"SELECT count(*) FROM {table} WHERE state = 0") == 1

    await eventually(committed, 10, "check-back committed the half message")

    async def recorded() -> bool:
        # The fire's outcome is recorded after the job returns, so after the commit.
        history = await dist.scheduler.history(CHECKBACK_JOB, 100)
        ran_here = set(dist.transactions.checkback_fires)
        return any(h["fire_id"] in ran_here and h["status"] == "succeeded" for h in history)

    await eventually(recorded, 10, "the check-back fire is in the history as succeeded")
