"""The near cache never outlives what it cannot know: a lost pub/sub connection drops it,
and no copy is served while it is down."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import redis.asyncio as aioredis

from tests.conftest import SECRET_KEYS
from tests.helpers.processes import ProcessGroup
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


async def test_a_node_whose_pubsub_connection_dropped_serves_no_copy_until_it_resubscribed(
    processes: ProcessGroup, redis_server: RedisServer, namespace: str
) -> None:
    """Between a dropped pub/sub connection and its restored subscription, every
    invalidation published is lost: a copy served then may be one another node ended."""
    env = {
        "ASGI_DIST_REDIS_URL": redis_server.url,
        "ASGI_DIST_NAMESPACE": namespace,
        "ASGI_DIST_SECRET_KEYS": ",".join(SECRET_KEYS),
        "SESSIONS_BACKEND": "redis",
        "SESSIONS_NEAR_CACHE": "1",
    }
    a, b = processes.uvicorn("tests.sessions.served:app", n=2, env=env)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(f"{a.url}/login/frank")
            cookie = {"cookie": f"session={r.cookies['session']}"}
            hits = (await http.get(f"{a.url}/near-cache")).json()["hits"]
            for _ in range(2):
                assert (await http.get(f"{a.url}/all", headers=cookie)).json()["user"] == "frank"
            assert (await http.get(f"{a.url}/near-cache")).json()["hits"] > hits  # A holds a copy
            # Every node's pub/sub connection drops and cannot come back (no new
            # connection is accepted); the connections the stores use stay up.
            connected = int((await admin.info("clients"))["connected_clients"])
            await admin.config_set("maxclients", connected - 2)
            assert await admin.client_kill_filter(_type="pubsub") == 2
            for _ in range(50):  # bounded: the nodes try to reconnect, and are refused
                await asyncio.sleep(0.05)
                if not any(
                    c["name"].startswith("asgi_dist:pubsub") for c in await admin.client_list()
                ):
                    break
            # Logout through B: its invalidation reaches nobody.
            assert (await http.post(f"{b.url}/logout", headers=cookie)).status_code == 200
            for _ in range(3):
                r = await http.get(f"{a.url}/all", headers=cookie)
                assert r.status_code == 200
                assert r.json() == {"data": {}, "user": None, "pid": a.pid}, "stale copy served"
            # Connections allowed again: A resubscribes and caches afresh.
            await admin.config_set("maxclients", 10_000)
            r = await http.post(f"{a.url}/login/frank")
            cookie = {"cookie": f"session={r.cookies['session']}"}
            for _ in range(100):  # bounded wait for A to resubscribe and serve a copy again
                hits = (await http.get(f"{a.url}/near-cache")).json()["hits"]
                await http.get(f"{a.url}/all", headers=cookie)
                if (await http.get(f"{a.url}/near-cache")).json()["hits"] > hits:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("A never served a cached copy again after resubscribing")
            # The usual case: the connection is killed and comes straight back.  A logout
            # published in between must not leave A serving its copy meanwhile.
            for i in range(10):
                http.cookies.clear()
                r = await http.post(f"{a.url}/login/u{i}")
                cookie = {"cookie": f"session={r.cookies['session']}"}
                http.cookies.clear()
                for _ in range(2):
                    await http.get(f"{a.url}/all", headers=cookie)
                await admin.client_kill_filter(_type="pubsub")
                assert (await http.post(f"{b.url}/logout", headers=cookie)).status_code == 200
                r = await http.get(f"{a.url}/all", headers=cookie)
                assert r.status_code == 200 and r.json()["user"] is None, f"stale copy, round {i}"
    finally:
        await admin.aclose()
