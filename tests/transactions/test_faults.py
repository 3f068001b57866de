"""Outages: PostgreSQL down answers 503; Redis down keeps rows in the outbox until it returns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
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
