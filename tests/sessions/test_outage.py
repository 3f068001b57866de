"""A store that is down costs a 503 with Retry-After, never a 500 or a hang, and recovery
needs nothing but the store coming back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.helpers.servers import RedisServer
from tests.sessions.conftest import client


async def test_redis_stopped_mid_run_gives_503_then_recovers(
    session_dist: Callable[..., Any], redis_server: RedisServer
) -> None:
    dist = await session_dist("redis", redis=redis_server.url, store_timeout=1.0)
    async with client(dist) as c:
        assert (await c.post("/set/k/v")).status_code == 200
        redis_server.kill()
        for call in (c.get("/get/k"), c.post("/set/k/w")):
            r = await call
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert "Traceback" not in r.text
        redis_server.start()  # same port, empty: the session is gone, the app works
        r = await c.get("/get/k")
        assert r.status_code == 200 and r.json()["value"] is None
        assert (await c.post("/set/k/again")).status_code == 200
        assert (await c.get("/get/k")).json()["value"] == "again"


async def test_a_paused_redis_gives_503_after_store_timeout_instead_of_hanging(
    session_dist: Callable[..., Any], redis_server: RedisServer
) -> None:
    dist = await session_dist("redis", redis=redis_server.url, store_timeout=0.5)
    async with client(dist) as c:
        assert (await c.post("/set/k/v")).status_code == 200
        redis_server.pause()
        try:
            r = await c.get("/get/k")
            assert r.status_code == 503
        finally:
            redis_server.resume()
        r = await c.get("/get/k")
        assert r.status_code == 200 and r.json()["value"] == "v"
