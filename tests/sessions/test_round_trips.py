"""Store round trips per request kind, counted on a real client as exact numbers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg

from tests.sessions.conftest import CountingRedis, client


async def _trips(redis: CountingRedis, call: Any) -> int:
    before = redis.round_trips
    response = await call
    assert response.status_code == 200
    return redis.round_trips - before


async def test_round_trips_are_0_1_2_for_no_cookie_read_only_and_modify(
    session_dist: Callable[..., Any], counting_redis: CountingRedis
) -> None:
    dist = await session_dist("redis", redis=counting_redis)
    async with client(dist) as c:
        assert await _trips(counting_redis, c.get("/get/k")) == 0  # no cookie, read-only
        assert await _trips(counting_redis, c.post("/set/k/v")) == 1  # new session: create
        assert await _trips(counting_redis, c.get("/get/k")) == 1  # read-only: load
        assert await _trips(counting_redis, c.get("/noop")) == 1  # untouched: load only
        assert await _trips(counting_redis, c.post("/set/k/w")) == 2  # load + delta save
        session_id, _, sig = c.cookies["session"].partition(".")
        c.cookies.clear()
        forged = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
        c.cookies.set("session", f"{session_id}.{forged}")
        assert await _trips(counting_redis, c.get("/get/k")) == 0  # forged: no store trip
        c.cookies.clear()
        c.cookies.set("session", "garbage")
        assert await _trips(counting_redis, c.get("/get/k")) == 0


async def test_a_read_only_request_on_a_near_cached_session_makes_no_round_trip(
    session_dist: Callable[..., Any], counting_redis: CountingRedis
) -> None:
    dist = await session_dist("redis", redis=counting_redis, near_cache=True)
    near = dist.sessions.near_cache

    async def echoed() -> None:
        for _ in range(100):  # bounded wait for this process's write to come back
            if len(near):
                return
            await asyncio.sleep(0.01)

    async with client(dist) as c:
        assert await _trips(counting_redis, c.post("/set/k/v")) == 1  # create, and keep
        for _ in range(3):
            assert await _trips(counting_redis, c.get("/get/k")) == 0  # hot: served locally
        for value in ("w", "x"):
            assert await _trips(counting_redis, c.post(f"/set/k/{value}")) == 1  # save only
            await echoed()
            before = counting_redis.round_trips
            r = await c.get("/get/k")
            assert r.json()["value"] == value  # the local copy holds this process's write
            assert counting_redis.round_trips == before
        assert await _trips(counting_redis, c.get("/get/k")) == 0
        # A write by another process (here: straight to the store) drops the copy.
        other = await session_dist("redis", near_cache=True, namespace=dist.namespace)
        cookie = {"cookie": f"session={c.cookies['session']}"}
        async with client(other) as on_other:
            assert (await on_other.post("/set/k/elsewhere", headers=cookie)).status_code == 200
        for _ in range(100):
            if not len(near):
                break
            await asyncio.sleep(0.01)
        assert await _trips(counting_redis, c.get("/get/k")) == 1  # reloaded
        assert (await c.get("/get/k")).json()["value"] == "elsewhere"
    assert near.hits >= 6


async def test_writes_in_a_row_through_one_near_cached_process_make_one_round_trip_each(
    session_dist: Callable[..., Any], counting_redis: CountingRedis
) -> None:
    # No wait between the writes: the next request finds the previous write's echo
    # pending and lets it arrive instead of loading the session again.
    dist = await session_dist("redis", redis=counting_redis, near_cache=True)
    async with client(dist) as c:
        assert await _trips(counting_redis, c.post("/set/k/v0")) == 1  # create
        assert (await c.get("/get/k")).json()["value"] == "v0"  # warm: script, subscription
        trips = [await _trips(counting_redis, c.post(f"/set/k/v{n}")) for n in range(1, 6)]
        assert trips == [1, 1, 1, 1, 1]  # the save only
        assert (await c.get("/get/k")).json()["value"] == "v5"


async def test_on_a_redis_url_requests_make_0_1_2_round_trips_on_the_multiplexed_connection(
    session_dist: Callable[..., Any], redis_url: str
) -> None:
    # A Dist built from a URL sends its per-request scripts over the multiplexed
    # connection; its redis-py client must see no per-request traffic at all.
    dist = await session_dist("redis", redis=redis_url)
    backend = dist.runtime.redis
    assert backend is not None and backend.multiplexed is not None
    mux = backend.multiplexed
    other = 0
    send = backend.client.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        nonlocal other
        other += 1
        return await send(*args, **options)

    backend.client.execute_command = counted  # type: ignore[method-assign]

    async def trips(call: Any) -> int:
        before = mux.commands_sent + other
        assert (await call).status_code == 200
        return mux.commands_sent + other - before

    async with client(dist) as c:
        assert await trips(c.get("/get/k")) == 0  # no cookie
        assert await trips(c.post("/set/k/v")) == 1  # create
        assert await trips(c.get("/get/k")) == 1  # read-only
        assert await trips(c.post("/set/k/w")) == 2  # load + delta save
        c.cookies.clear()
        c.cookies.set("session", "forged.cookie")
        assert await trips(c.get("/get/k")) == 0
    assert other == 0


async def test_near_cached_writes_on_a_redis_url_make_one_round_trip_each(
    session_dist: Callable[..., Any], redis_url: str
) -> None:
    # On the multiplexed connection a write's echo (read on the pub/sub connection)
    # often arrives before the write's own reply: it must still count as ours.
    dist = await session_dist("redis", redis=redis_url, near_cache=True)
    backend = dist.runtime.redis
    assert backend is not None and backend.multiplexed is not None
    mux = backend.multiplexed

    async def trips(call: Any) -> int:
        before = mux.commands_sent
        assert (await call).status_code == 200
        return mux.commands_sent - before

    async with client(dist) as c:
        assert await trips(c.post("/set/k/v0")) == 1  # create
        assert (await c.get("/get/k")).json()["value"] == "v0"  # warm
        writes = [await trips(c.post(f"/set/k/v{n}")) for n in range(1, 21)]
        assert writes == [1] * 20  # the save only: the copy stays
        reads = [await trips(c.get("/get/k")) for _ in range(5)]
        assert reads == [0] * 5
        assert (await c.get("/get/k")).json()["value"] == "v20"


class CountingConnection(asyncpg.Connection):  # type: ignore[misc]
    """A real connection that counts the statements sent to the sessions table (other
    capabilities of the Dist, such as the outbox relay, share the pool)."""

    statements = 0

    @classmethod
    def _count(cls, query: str) -> None:
        if "_sessions " in query:
            cls.statements += 1

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._count(query)
        return await super().fetchrow(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._count(query)
        return await super().fetchval(query, *args, **kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._count(query)
        return await super().fetch(query, *args, **kwargs)

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._count(query)
        return await super().execute(query, *args, **kwargs)


async def test_postgres_statements_are_0_1_2_for_no_cookie_read_only_and_modify(
    session_dist: Callable[..., Any], postgres_dsn: str
) -> None:
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=10,
                                     connection_class=CountingConnection)  # fmt: skip
    dist = await session_dist("postgres", postgres=pool)

    async def statements(call: Any) -> int:
        before = CountingConnection.statements
        assert (await call).status_code == 200
        return CountingConnection.statements - before

    try:
        async with client(dist) as c:
            assert await statements(c.get("/get/k")) == 0
            assert await statements(c.post("/set/k/v")) == 1
            assert await statements(c.get("/get/k")) == 1
            assert await statements(c.post("/set/k/w")) == 2
            c.cookies.clear()
            c.cookies.set("session", "forged.cookie")
            assert await statements(c.get("/get/k")) == 0
    finally:
        await dist.stop()  # releases the pool's connections before it closes
        await asyncio.wait_for(pool.close(), 10)
