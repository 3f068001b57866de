"""Outages: PostgreSQL down answers 503; Redis down keeps rows in the outbox until it returns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dist import Dist, get_tx
from asgi_dist.transactions import Message, Transaction
from tests.helpers.servers import RedisServer
from tests.transactions.proxy import TcpProxy
from tests.transactions.waiting import eventually


def app_for(dist: Dist) -> Any:
    async def publish(request: Request) -> JSONResponse:
        n = int(request.query_params.get("n", "1"))
        for i in range(n):
            await get_tx().publish("faults", {"i": i}, key=f"k{i % 3}")
        return JSONResponse({"published": n})

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    routes = [Route("/publish", publish, methods=["POST"]), Route("/hello", hello)]
    return dist.wrap(Starlette(routes=routes))


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def unpublished(pg: asyncpg.Connection, dist: Dist) -> int:
    n: int = await pg.fetchval(
        f"SELECT count(*) FROM {dist.namespace}_outbox WHERE published_at IS NULL"
    )
    return n


async def test_postgres_down_answers_503_for_requests_that_need_it(
    fast_dist: Callable[..., Any], pg_proxy: tuple[TcpProxy, str], pg: asyncpg.Connection
) -> None:
    proxy, dsn = pg_proxy
    dist: Dist = await fast_dist(postgres=dsn)
    async with client(app_for(dist)) as http:
        await proxy.cut()
        down = await http.post("/publish")
        unaffected = await http.get("/hello")
        await proxy.restore()
        back = None
        for _ in range(50):  # the pool reconnects on the next acquire
            back = await http.post("/publish")
            if back.status_code == 200:
                break
            await asyncio.sleep(0.1)
    assert down.status_code == 503
    assert int(down.headers["retry-after"]) >= 1
    assert unaffected.status_code == 200
    assert back is not None and back.status_code == 200
    assert await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_outbox") == 1


async def test_redis_down_leaves_rows_in_the_outbox_until_it_returns(
    fast_dist: Callable[..., Any], redis_server: RedisServer, pg: asyncpg.Connection
) -> None:
    dist: Dist = await fast_dist(redis=redis_server.url)
    stream = f"{{{dist.namespace}:topic:faults}}:stream"
    async with client(app_for(dist)) as http:
        redis_server.kill()
        response = await http.post("/publish?n=20")
        assert response.status_code == 200  # the outbox needs only PostgreSQL
        await asyncio.sleep(1.0)  # several relay attempts fail meanwhile
        assert await unpublished(pg, dist) == 20
        redis_server.start()
        for _ in range(100):
            if await unpublished(pg, dist) == 0:
                break
            await asyncio.sleep(0.1)
    assert await unpublished(pg, dist) == 0
    check = aioredis.Redis.from_url(redis_server.url)
    try:
        entries = await check.xrange(stream)
    finally:
        await check.aclose()
    assert len(entries) == 20


async def test_relay_and_consumer_wait_out_a_postgres_outage_and_lose_nothing(
    fast_dist: Callable[..., Any], pg_proxy: tuple[TcpProxy, str], pg: asyncpg.Connection
) -> None:
    proxy, dsn = pg_proxy
    dist: Dist = await fast_dist(postgres=dsn)
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (msg_id uuid)")

    @dist.consumer("faults", group="g", concurrency=4)
    async def handle(message: Message, tx: Transaction) -> None:
        await tx.execute(f"INSERT INTO {ns}_effects VALUES ($1)", message.id)

    async def publish(n: int) -> None:
        # Straight to the database, not through the proxy the Dist uses.
        async with pg.transaction():
            tx = Transaction(dist.transactions.outbox, pg)
            for i in range(n):
                await tx.publish("faults", {"i": i})

    async def effects(n: int) -> bool:
        return bool(await pg.fetchval(f"SELECT count(DISTINCT msg_id) FROM {ns}_effects") == n)

    await publish(10)
    await eventually(lambda: effects(10), 15, "first 10 handled")
    await eventually(lambda: _is_zero(unpublished(pg, dist)), 15, "first 10 marked published")
    await proxy.cut()
    await publish(10)
    await asyncio.sleep(1.0)  # relay and consumer retry meanwhile
    assert await unpublished(pg, dist) == 10
    await proxy.restore()
    await eventually(lambda: effects(20), 20, "all 20 handled after the outage")
    assert await pg.fetchval(f"SELECT count(*) FROM {ns}_effects") == 20


async def _is_zero(value: Any) -> bool:
    return bool(await value == 0)


@pytest.mark.parametrize("pool_passed_in", [False, True], ids=["own-pool", "pool-passed-in"])
@pytest.mark.parametrize("moment", ["idle", "busy", "caught"])
async def test_postgres_lost_inside_an_open_request_transaction_answers_503(
    fast_dist: Callable[..., Any],
    pg_proxy: tuple[TcpProxy, str],
    pg: asyncpg.Connection,
    moment: str,
    pool_passed_in: bool,
) -> None:
    """The connection dies while the request holds its transaction: idle between
    queries, in the middle of one, or under an endpoint that catches the error and
    answers 200 (its COMMIT then has no connection to go to)."""
    proxy, dsn = pg_proxy
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4) if pool_passed_in else None
    dist: Dist = await fast_dist(postgres=pool or dsn)
    opened = asyncio.Event()
    cut = asyncio.Event()

    async def endpoint(request: Request) -> JSONResponse:
        tx = get_tx()
        await tx.execute("SELECT 1")
        opened.set()
        if moment == "busy":
            await tx.execute("SELECT pg_sleep(5)")
            return JSONResponse({"slept": True})
        await asyncio.wait_for(cut.wait(), 10)
        try:
            await tx.execute("SELECT 2")
        except Exception:
            if moment != "caught":
                raise
        return JSONResponse({"ok": True})

    async def sleeping() -> bool:
        return bool(
            await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)'"
                " AND state = 'active'"
            )
        )

    app = dist.wrap(Starlette(routes=[Route("/open", endpoint)]))
    try:
        async with client(app) as http:
            request = asyncio.create_task(http.get("/open"))
            await asyncio.wait_for(opened.wait(), 10)
            if moment == "busy":
                await eventually(sleeping, 5, "the query runs")
            await proxy.cut()
            cut.set()
            response = await asyncio.wait_for(request, 10)
    finally:
        if pool is not None:
            await dist.stop()
            pool.terminate()
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1


async def test_postgres_lost_under_a_running_handler_spends_no_attempt(
    fast_dist: Callable[..., Any],
    pg_proxy: tuple[TcpProxy, str],
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
) -> None:
    proxy, dsn = pg_proxy
    dist: Dist = await fast_dist(postgres=dsn)
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (msg_id uuid)")
    running = asyncio.Event()
    cut = asyncio.Event()
    attempts: list[int] = []

    @dist.consumer("faults", group="g", max_deliveries=1)
    async def handle(message: Message, tx: Transaction) -> None:
        attempts.append(message.attempt)
        await tx.execute("SELECT 1")  # the delivery's transaction is open
        if len(attempts) == 1:
            running.set()
            await asyncio.wait_for(cut.wait(), 10)
        await tx.execute(f"INSERT INTO {ns}_effects VALUES ($1)", message.id)

    async with pg.transaction():  # straight to the database, not through the proxy
        msg_id = await Transaction(dist.transactions.outbox, pg).publish("faults", {"i": 1})
    await asyncio.wait_for(running.wait(), 15)
    await proxy.cut()
    cut.set()
    await asyncio.sleep(1.0)  # the delivery retries meanwhile
    await proxy.restore()
    stream = f"{{{ns}:topic:faults}}:stream"

    async def acked() -> bool:
        return bool((await redis_client.xpending(stream, "g"))["pending"] == 0)

    await eventually(acked, 20, "the message handled after the outage")
    rows = await pg.fetch(f"SELECT msg_id::text AS id FROM {ns}_effects")
    assert [r["id"] for r in rows] == [msg_id]
    assert await redis_client.xlen(f"{{{ns}:topic:faults}}:dead:g") == 0
    assert set(attempts) == {1}


async def test_a_misused_query_on_a_live_connection_stays_an_error_not_an_outage(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    """asyncpg raises InterfaceError for a wrong argument count too: the connection is
    alive, so the request answers 500 and the delivery spends its attempt."""
    dist: Dist = await fast_dist()
    ns = dist.namespace
    misuse = "SELECT $1::int"  # given two arguments: an InterfaceError

    async def endpoint(request: Request) -> JSONResponse:
        await get_tx().execute(misuse, 1, 2)
        return JSONResponse({"ok": True})

    @dist.consumer("faults", group="g", max_deliveries=1)
    async def handle(message: Message, tx: Transaction) -> None:
        await tx.execute(misuse, 1, 2)

    async with client(dist.wrap(Starlette(routes=[Route("/misuse", endpoint)]))) as http:
        response = await http.get("/misuse")
    assert response.status_code == 500
    async with pg.transaction():
        await Transaction(dist.transactions.outbox, pg).publish("faults", {"i": 1})
    dead = f"{{{ns}:topic:faults}}:dead:g"
    await eventually(lambda: redis_client.xlen(dead), 15, "the message dead-lettered")
    [(_, fields)] = await redis_client.xrange(dead)
    assert fields[b"error"].startswith(b"InterfaceError: the server expects 1 argument")
