"""A frozen Redis (SIGSTOP: its kernel still accepts connections and buffers
commands, nothing answers) bounds lock calls; it does not hang them.

A lock attempt gets the caller's remaining timeout (at least a second) and then
raises BackendUnavailable, which a request answers with 503; once Redis answers
again, the attempt that may have run is undone and nothing is left behind.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dist import BackendUnavailable, Dist, get_locks
from tests.helpers.servers import RedisServer


async def _only_the_fence_is_left(url: str, dist: Dist, name: str) -> None:
    admin = aioredis.Redis.from_url(url)
    try:
        for _ in range(500):  # bounded: 10 s for the undo that waited for Redis
            keys = {k.decode() for k in await admin.keys(f"{{{dist.namespace}:lock:{name}}}*")}
            if keys <= {f"{{{dist.namespace}:lock:{name}}}:fence"}:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"left behind: {sorted(keys)}")
    finally:
        await admin.aclose()


async def test_an_attempt_on_a_frozen_redis_raises_backend_unavailable_within_its_timeout(
    make_dist: Any, redis_server: RedisServer
) -> None:
    dist: Dist = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    await (await dist.lock("warm").acquire()).release()  # connected before the freeze
    redis_server.pause()
    try:
        for timeout in (0, 1.5):
            # The outer bound turns a hang into a failure; the lock's own is the point.
            async with asyncio.timeout(8):
                try:
                    await dist.lock("frozen", ttl=5).acquire(timeout=timeout)
                except BackendUnavailable as exc:
                    assert "did not answer an attempt on lock 'frozen'" in str(exc)
                else:
                    raise AssertionError("acquired on a frozen Redis")
    finally:
        redis_server.resume()
    await _only_the_fence_is_left(redis_server.url, dist, "frozen")
    again = await dist.lock("frozen").acquire(timeout=0)
    await again.release()


async def test_a_request_lock_on_a_frozen_redis_answers_503(
    make_dist: Any, redis_server: RedisServer
) -> None:
    dist: Dist = await make_dist(redis=redis_server.url, postgres=None, sessions=False)

    async def order(request: Request) -> JSONResponse:
        held = await get_locks().acquire("order:1", timeout=1)
        return JSONResponse({"fence": held.fence})

    app = dist.wrap(Starlette(routes=[Route("/order", order)]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/order")).status_code == 200
        redis_server.pause()
        try:
            async with asyncio.timeout(8):
                frozen = await client.get("/order")
        finally:
            redis_server.resume()
        assert frozen.status_code == 503
        assert frozen.headers["retry-after"]
        assert (await client.get("/order")).status_code == 200
    await _only_the_fence_is_left(redis_server.url, dist, "order:1")


async def test_a_release_on_a_frozen_redis_raises_backend_unavailable(
    make_dist: Any, redis_server: RedisServer
) -> None:
    dist: Dist = await make_dist(redis=redis_server.url, postgres=None, sessions=False, start=False)
    assert dist.runtime.redis is not None and dist.runtime.redis.multiplexed is not None
    dist.runtime.redis.multiplexed.dead_after = 0.5  # the connection's bound, shortened
    await dist.start()
    held = await dist.lock("frozen", ttl=5).acquire()
    redis_server.pause()
    try:
        async with asyncio.timeout(8):
            try:
                await held.release()
            except BackendUnavailable as exc:
                assert "could not release lock 'frozen'" in str(exc)
                assert "ends by its ttl (5s)" in str(exc)
            else:
                raise AssertionError("released on a frozen Redis")
    finally:
        redis_server.resume()
    # Not renewed any more: it expires, and the lock is free again.
    again = await dist.lock("frozen").acquire(timeout=10)
    assert again.fence > held.fence
    await again.release()
