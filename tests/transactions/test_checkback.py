"""Transactional messages: half message, commit on exit, check-back when the process died."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from asgi_dist import Dist, TransactionError
from asgi_dist.transactions import CheckResult, Message
from tests.helpers.processes import ProcessGroup
from tests.transactions import payments
from tests.transactions.waiting import eventually
from tests.transactions.workers import WORKER


@pytest.fixture
async def dist(fast_dist: Callable[..., Any], pg: asyncpg.Connection, postgres_dsn: str) -> Dist:
    d: Dist = await fast_dist()
    await pg.execute(f"CREATE TABLE {d.namespace}_orders (id int PRIMARY KEY)")
    payments.configure(postgres_dsn, d.namespace)
    return d


async def stream_ids(redis_client: aioredis.Redis, dist: Dist) -> list[str]:
    entries = await redis_client.xrange(f"{{{dist.namespace}:topic:payments.done}}:stream")
    return [fields[b"id"].decode() for _, fields in entries]


async def half_rows(pg: asyncpg.Connection, dist: Dist) -> int:
    n: int = await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_outbox WHERE state = 1")
    return n


async def test_the_message_is_invisible_inside_and_published_on_normal_exit(
    dist: Dist, pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    async with dist.transactional_message("payments.done", {"order": 1}, check=payments.check) as m:
        await pg.execute(payments.insert_order(), 1)
        assert await half_rows(pg, dist) == 1
        assert await stream_ids(redis_client, dist) == []

    async def published() -> bool:
        return await stream_ids(redis_client, dist) == [m.id]

    await eventually(published, 10, "message published")


async def test_an_exception_in_the_body_discards_the_message(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    with pytest.raises(RuntimeError):
        async with dist.transactional_message("payments.done", {"order": 2}, check=payments.check):
            raise RuntimeError("local work failed")
    assert await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_outbox") == 0


async def test_a_message_unknown_after_max_checks_is_discarded(
    dist: Dist, pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    asked: list[int] = []

    async def undecided(message: Message) -> CheckResult:
        asked.append(message.attempt)
        return CheckResult.UNKNOWN

    message = dist.transactional_message(
        "payments.done", {"order": 3}, check=undecided, check_after=0.2, check_interval=0.2,
        max_checks=3,
    )  # fmt: skip
    with pytest.raises(TransactionError, match=r"check-back already rolled back \(discarded\)"):
        async with message:
            # The body outlives every check: check-back gives up and discards it.
            await eventually(lambda: _is_zero(half_rows(pg, dist)), 10, "discarded")
    assert asked == [1, 2, 3]
    assert await stream_ids(redis_client, dist) == []


async def test_a_body_slower_than_check_after_exits_cleanly_when_check_back_committed(
    dist: Dist, pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    done: set[int] = set()

    async def work_done(message: Message) -> CheckResult:
        return CheckResult.COMMIT if message.payload["order"] in done else CheckResult.UNKNOWN

    message = dist.transactional_message(
        "payments.done", {"order": 4}, check=work_done, check_after=0.2, check_interval=0.2
    )
    async with message:
        done.add(4)  # the local work committed; something slow follows
        await eventually(lambda: _is_zero(half_rows(pg, dist)), 10, "committed by check-back")
    # Check-back decided as the body would have: no error, and the message leaves once.

    async def published() -> bool:
        return await stream_ids(redis_client, dist) == [message.id]

    await eventually(published, 10, "message published")


@pytest.mark.parametrize(("mode", "published"), [("after-commit", True), ("before-commit", False)])
async def test_a_process_killed_inside_gets_its_message_resolved_by_check_back(
    dist: Dist,
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    tmp_path: Path,
    mode: str,
    published: bool,
) -> None:
    # This process answers check-backs; the worker dies inside the body.
    dist.transactions.register_check(payments.check)
    env = {
        "ASGI_DIST_REDIS_URL": redis_url,
        "ASGI_DIST_POSTGRES_DSN": postgres_dsn,
        "ASGI_DIST_NAMESPACE": dist.namespace,
        "WORKER_STATE": str(tmp_path),
    }
    (worker,) = processes.python(WORKER, 1, env, args=["half", mode])
    inside = tmp_path / "inside"

    async def is_inside() -> bool:
        return inside.exists() and bool(inside.read_text())

    try:
        await eventually(is_inside, 30, "worker inside the transactional message")
    except AssertionError:
        raise AssertionError(worker.output()) from None
    worker.kill()
    msg_id = inside.read_text()
    assert await half_rows(pg, dist) == 1  # left undecided by the dead process
    await eventually(lambda: _is_zero(half_rows(pg, dist)), 15, "check-back decided")
    orders = await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_orders")
    assert orders == (1 if published else 0)
    if published:

        async def in_stream() -> bool:
            return await stream_ids(redis_client, dist) == [msg_id]

        await eventually(in_stream, 10, "message published")
    else:
        assert await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_outbox") == 0
        assert await stream_ids(redis_client, dist) == []


async def _is_zero(value: Any) -> bool:
    return bool(await value == 0)
