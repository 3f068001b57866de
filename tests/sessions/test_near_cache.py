"""The near cache never outlives what it cannot know: a lost pub/sub connection drops it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.helpers.servers import RedisServer
from tests.sessions.conftest import client


async def test_a_reconnect_of_the_pubsub_connection_drops_every_cached_session(
    session_dist: Callable[..., Any], redis_server: RedisServer
) -> None:
    dist = await session_dist("redis", redis=redis_server.url, near_cache=True)
    near = dist.sessions.near_cache
    async with client(dist) as c:
        await c.post("/set/k/v")
        await c.get("/get/k")  # cached now
        hits = near.hits
        assert (await c.get("/get/k")).json()["value"] == "v" and near.hits == hits + 1
        # Restarted empty: invalidations published meanwhile could have been missed.
        redis_server.restart()
        for _ in range(100):  # bounded wait for the hub to reconnect and resync
            if dist.runtime.pubsub.reconnects >= 1 and not len(near):
                break
            await asyncio.sleep(0.05)
        assert not len(near), "the near cache kept copies across a pub/sub reconnect"
        for _ in range(3):  # a pooled connection that died with the server costs a 503
            r = await c.get("/get/k")
            if r.status_code != 503:
                break
        assert r.status_code == 200 and r.json()["value"] is None  # the store's truth


async def test_a_session_regenerated_elsewhere_is_not_served_from_the_cache(
    session_dist: Callable[..., Any],
) -> None:
    # Two Dists stand for two processes sharing Redis (real processes: test_processes.py).
    a = await session_dist("redis", near_cache=True)
    b = await session_dist("redis", near_cache=True, regenerate_grace=0.0)
    async with client(a) as on_a, client(b) as on_b:
        await on_a.post("/set/k/v")
        cookie = {"cookie": f"session={on_a.cookies['session']}"}
        await on_a.get("/get/k", headers=cookie)  # cached on A
        await on_b.post("/login/frank", headers=cookie)  # B moves it to a new id
        for _ in range(100):  # bounded wait for the invalidation to reach A
            if not len(a.sessions.near_cache):
                break
            await asyncio.sleep(0.01)
        r = await on_a.get("/get/k", headers=cookie)
        assert r.json()["value"] is None  # the old id is gone (no grace on B)
