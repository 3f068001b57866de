"""Consumers: exactly-once effects through the inbox, retries, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.transactions import Message, Transaction
from asgi_dist.transactions.consumer import Consumer, ConsumerSpec
from tests.transactions.settings import FAST
from tests.transactions.waiting import eventually


async def publish(dist: Dist, topic: str, payloads: list[Any], key: str | None = None) -> list[str]:
    pool = dist.runtime.require_postgres("test").pool
    async with pool.acquire() as conn, conn.transaction():
        tx = Transaction(dist.transactions.outbox, conn)
        return [await tx.publish(topic, p, key=key) for p in payloads]


async def test_a_message_delivered_twice_has_its_effect_once(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    dist: Dist = await fast_dist()
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (msg_id uuid, n int)")

    @dist.consumer("work", group="g", concurrency=4)
    async def handle(message: Message, tx: Transaction) -> None:
        await tx.execute(
            f"INSERT INTO {ns}_effects VALUES ($1, $2)", message.id, message.payload["n"]
        )

    ids = await publish(dist, "work", [{"n": i} for i in range(10)])

    async def effects() -> int:
        n: int = await pg.fetchval(f"SELECT count(*) FROM {ns}_effects")
        return n

    await eventually(lambda: _eq(effects(), 10))
    # Deliver every message again, as a relay that died before marking its batch would.
    stream = f"{{{ns}:topic:work}}:stream"
    entries = await redis_client.xrange(stream)
    for _, fields in entries:
        await redis_client.xadd(stream, fields)

    async def all_acked() -> bool:
        info = await redis_client.xpending(stream, "g")
        length = await redis_client.xlen(stream)
        groups = await redis_client.xinfo_groups(stream)
        return bool(info["pending"] == 0 and length == 20 and groups[0]["entries-read"] == 20)

    await eventually(all_acked)
    rows = await pg.fetch(f"SELECT msg_id::text AS id, count(*) AS c FROM {ns}_effects GROUP BY 1")
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert all(r["c"] == 1 for r in rows)


async def test_a_failing_handler_is_retried_then_dead_lettered_with_its_error(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    dist: Dist = await fast_dist()
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (n int)")
    attempts: list[tuple[int, int]] = []

    @dist.consumer("work", group="g", max_deliveries=3)
    async def handle(message: Message, tx: Transaction) -> None:
        attempts.append((message.payload["n"], message.attempt))
        await tx.execute(f"INSERT INTO {ns}_effects VALUES ($1)", message.payload["n"])
        if message.payload["n"] == 0:
            raise ValueError("poison")

    await publish(dist, "work", [{"n": 0}, {"n": 1}])
    dead = f"{{{ns}:topic:work}}:dead:g"
    await eventually(lambda: redis_client.xlen(dead))
    entries = await redis_client.xrange(dead)
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields[b"error"] == b"ValueError: poison"
    assert fields[b"deliveries"] == b"3"
    assert b'"n":0' in fields[b"payload"]
    assert [a for n, a in attempts if n == 0] == [1, 2, 3]
    # Each failed attempt rolled back; the good message committed once.
    assert [r["n"] for r in await pg.fetch(f"SELECT n FROM {ns}_effects")] == [1]
    assert (await redis_client.xpending(f"{{{ns}:topic:work}}:stream", "g"))["pending"] == 0


async def test_a_handler_past_its_timeout_is_retried(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection
) -> None:
    dist: Dist = await fast_dist()
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (attempt int)")

    @dist.consumer("slow", group="g", timeout=0.2)
    async def handle(message: Message, tx: Transaction) -> None:
        await tx.execute(f"INSERT INTO {ns}_effects VALUES ($1)", message.attempt)
        if message.attempt == 1:
            await asyncio.sleep(5)

    await publish(dist, "slow", [{}])

    async def done() -> bool:
        return bool(await pg.fetchval(f"SELECT count(*) FROM {ns}_effects"))

    await eventually(done)
    assert [r["attempt"] for r in await pg.fetch(f"SELECT attempt FROM {ns}_effects")] == [2]


@pytest.mark.parametrize("consumer_timeout", [None, 30.0])
async def test_a_timeout_the_handler_raises_itself_is_reported_as_its_own_error(
    fast_dist: Callable[..., Any], redis_client: aioredis.Redis, consumer_timeout: float | None
) -> None:
    """A call the handler bounded timed out: the dead letter names that error, not a
    consumer timeout that never happened."""
    dist: Dist = await fast_dist()

    @dist.consumer("mail", group="g", max_deliveries=1, timeout=consumer_timeout)
    async def handle(message: Message, tx: Transaction) -> None:
        raise TimeoutError("the mail server did not answer within 2s")

    await publish(dist, "mail", [{}])
    dead = f"{{{dist.namespace}:topic:mail}}:dead:g"
    await eventually(lambda: redis_client.xlen(dead), 15, "the message dead-lettered")
    [(_, fields)] = await redis_client.xrange(dead)
    assert fields[b"error"] == b"TimeoutError: the mail server did not answer within 2s"


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_slow_handler_keeps_its_message_by_heartbeat(
    fast_dist: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    # Two members of the group; the handler outlives reclaim_after (2 s) by far.
    first: Dist = await fast_dist()
    second: Dist = await fast_dist()
    running: list[str] = []

    for member in (first, second):

        @member.consumer("slow", group="g")
        async def handle(message: Message, tx: Transaction, name: str = member.node_id) -> None:
            running.append(name)
            await asyncio.sleep(4)

    await publish(first, "slow", [{}])

    async def started() -> bool:
        return bool(running)

    await eventually(started, 10)
    await asyncio.sleep(3)  # past reclaim_after: without heartbeats the other member takes it
    stream = f"{{{first.namespace}:topic:slow}}:stream"
    pending = await redis_client.xpending_range(stream, "g", "-", "+", 10)
    assert len(pending) == 1
    assert pending[0]["consumer"].decode() == running[0]  # still with the member running it
    assert pending[0]["times_delivered"] == 1  # never reclaimed


async def test_names_of_dead_consumers_are_pruned_but_not_those_with_pending_entries(
    fast_dist: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    dist: Dist = await fast_dist()

    async def handle(message: Message, tx: Transaction) -> None:
        return None

    consumer = Consumer(
        ConsumerSpec("prune", "g", handle),
        dist.runtime.require_postgres("test"),
        dist.runtime.require_redis("test"),
        dist.transactions.outbox,
        dist.transactions.config,
        "me",
        asyncio.Event(),
        asyncio.Semaphore(1),
    )
    stream = f"{{{dist.namespace}:topic:prune}}:stream"
    await redis_client.xgroup_create(stream, "g", id="0", mkstream=True)
    for name in ("me", "dead-idle"):
        await redis_client.xgroup_createconsumer(stream, "g", name)
    await redis_client.xadd(stream, {"id": "x"})
    await redis_client.xreadgroup("g", "dead-with-pending", {stream: ">"}, count=1)
    assert await consumer.prune(idle=0.0) == 1
    members = {c["name"].decode() for c in await redis_client.xinfo_consumers(stream, "g")}
    assert members == {"me", "dead-with-pending"}  # its pending entry is not dropped


async def test_work_lost_to_an_error_the_handler_caught_is_retried_not_acked(
    fast_dist: Callable[..., Any],
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dist: Dist = await fast_dist()
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (n int)")
    attempts: list[int] = []

    @dist.consumer("work", group="g", max_deliveries=2)
    async def handle(message: Message, tx: Transaction) -> None:
        attempts.append(message.attempt)
        await tx.execute(f"INSERT INTO {ns}_effects VALUES (1)")
        with contextlib.suppress(asyncpg.DivisionByZeroError):
            await tx.execute("SELECT 1 / $1::int", 0)  # aborts the transaction, caught
        # PostgreSQL answers this transaction's COMMIT with ROLLBACK.

    await publish(dist, "work", [{}])
    dead = f"{{{ns}:topic:work}}:dead:g"
    await eventually(lambda: redis_client.xlen(dead), 15, "dead-lettered")
    error = (await redis_client.xrange(dead))[0][1][b"error"].decode()
    assert "refused to commit" in error and "DivisionByZeroError" in error
    assert attempts == [1, 2]
    assert await pg.fetchval(f"SELECT count(*) FROM {ns}_effects") == 0
    assert await pg.fetchval(f"SELECT count(*) FROM {ns}_inbox") == 0
    assert dist.transactions.consumers[0].handled == 0
    assert "attempt 1 failed (TransactionError: PostgreSQL refused to commit" in caplog.text


async def test_retry_backoff_keeps_doubling_past_reclaim_after(
    fast_dist: Callable[..., Any],
) -> None:
    config = replace(FAST, reclaim_after=1.0, retry_backoff=0.4, retry_backoff_max=30.0)
    dist: Dist = await fast_dist(transactions=config)
    loop = asyncio.get_running_loop()
    times: list[float] = []

    @dist.consumer("work", group="g", max_deliveries=4)
    async def handle(message: Message, tx: Transaction) -> None:
        times.append(loop.time())
        raise RuntimeError("fails every time")

    await publish(dist, "work", [{}])

    async def four() -> bool:
        return len(times) == 4

    await eventually(four, 15, "four attempts")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.4, 0.8, then 1.6 s: past reclaim_after (1 s), which used to cap it.
    assert 1.5 <= gaps[2] < 3.0, gaps
    assert gaps[0] < gaps[1] < gaps[2], gaps


async def test_slow_handlers_leave_connections_for_requests_and_the_relay(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection
) -> None:
    """A consumer as concurrent as the pool is large (10), its handlers all busy: the
    requests of the same process still get a connection (no 503), and the relay still
    publishes what they commit."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asgi_dist import get_tx

    dist: Dist = await fast_dist()
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (msg_id uuid)")
    release = asyncio.Event()
    running: list[str] = []

    @dist.consumer("slow", group="g", concurrency=10)
    async def handle(message: Message, tx: Transaction) -> None:
        await tx.execute(f"INSERT INTO {ns}_effects VALUES ($1)", message.id)
        running.append(message.id)
        await asyncio.wait_for(release.wait(), 30)

    async def order(request: Request) -> JSONResponse:
        return JSONResponse({"id": await get_tx().publish("orders", {"n": 1})})

    await publish(dist, "slow", [{"n": i} for i in range(10)])
    await eventually(lambda: _ge(len(running), 5), 15, "the handlers busy")
    await asyncio.sleep(0.5)  # any handler that can start has started
    app = dist.wrap(Starlette(routes=[Route("/order", order, methods=["POST"])]))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        answers = await asyncio.gather(*[http.post("/order") for _ in range(20)])
    assert [a.status_code for a in answers] == [200] * 20

    async def published() -> bool:
        return bool(
            await pg.fetchval(
                f"SELECT count(*) FROM {ns}_outbox WHERE topic = 'orders'"
                " AND published_at IS NOT NULL"
            )
            == 20
        )

    await eventually(published, 10, "the relay published the requests' messages")
    assert not release.is_set()  # all the while the handlers were busy
    release.set()

    async def all_handled() -> bool:
        return bool(await pg.fetchval(f"SELECT count(*) FROM {ns}_effects") == 10)

    await eventually(all_handled, 30, "every slow message handled once")


async def _ge(value: int, least: int) -> bool:
    return value >= least


async def test_a_deleted_group_is_recreated_without_rerunning_what_its_inbox_forgot(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    """A group deleted by hand (or lost with a Redis restarted empty) comes back without
    handling again the messages whose inbox rows were purged; a group that is new still
    gets every message the stream holds."""
    from asgi_dist.transactions.relay import purge_once

    config = replace(FAST, inbox_retention=1.0)
    dist: Dist = await fast_dist(transactions=config)
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (grp text, msg_id uuid)")

    def record(group: str) -> Any:
        async def handle(message: Message, tx: Transaction) -> None:
            await tx.execute(f"INSERT INTO {ns}_effects VALUES ($1, $2)", group, message.id)

        return handle

    dist.consumer("work", group="g")(record("g"))
    old = await publish(dist, "work", [{"n": i} for i in range(5)])

    async def effects(group: str, n: int) -> bool:
        sql = f"SELECT count(*) FROM {ns}_effects WHERE grp = $1"
        return bool(await pg.fetchval(sql, group) == n)

    await eventually(lambda: effects("g", 5), 15, "the first 5 handled")
    await asyncio.sleep(1.5)  # past inbox_retention
    await purge_once(dist.runtime.require_postgres("test"), config)
    assert await pg.fetchval(f"SELECT count(*) FROM {ns}_inbox") == 0
    stream = f"{{{ns}:topic:work}}:stream"
    assert await redis_client.xgroup_destroy(stream, "g")
    new = await publish(dist, "work", [{"n": 5}])
    await eventually(lambda: effects("g", 6), 15, "the new message handled")
    dist.consumer("work", group="late")(record("late"))  # a new group: reads it all
    await eventually(lambda: effects("late", 6), 15, "the new group handled everything")
    await asyncio.sleep(0.5)  # room for a message handled twice to show
    rows = await pg.fetch(f"SELECT msg_id::text AS id FROM {ns}_effects WHERE grp = 'g'")
    assert sorted(r["id"] for r in rows) == sorted(old + new)
