"""Sessions on a Redis Cluster: every script touches one slot (the id's shard keeps the
old and the new key of a regenerate together); user indexes take their own round trips."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.sessions.conftest import client


async def test_sessions_regenerate_and_user_indexes_work_on_redis_cluster(
    session_dist: Callable[..., Any], cluster_url: str
) -> None:
    dist = await session_dist("redis", redis=cluster_url, near_cache=True)
    browsers = [client(dist) for _ in range(3)]
    try:
        for i, b in enumerate(browsers):
            await b.post(f"/set/n/{i}")
            r = await b.post("/login/dora")
            assert r.status_code == 200
            assert (await b.get("/all")).json()["data"] == {"n": str(i)}
        cookie = {"cookie": f"session={browsers[0].cookies['session']}"}
        writes = [browsers[1].post(f"/set/k{i}/{i}", headers=cookie) for i in range(30)]
        assert all(r.status_code == 200 for r in await asyncio.gather(*writes))
        data = (await browsers[0].get("/all")).json()["data"]
        assert data == {"n": "0", **{f"k{i}": str(i) for i in range(30)}}
        assert len(await dist.sessions.list_user("dora")) == 3
        assert await dist.sessions.invalidate_user("dora") == 3
        for b in browsers:
            assert (await b.get("/all")).json()["data"] == {}
        assert await dist.sessions.list_user("dora") == []
    finally:
        for b in browsers:
            await b.aclose()


async def test_a_logout_on_redis_cluster_ends_the_ids_a_rotated_login_left_readable(
    session_dist: Callable[..., Any], cluster_url: str
) -> None:
    dist = await session_dist("redis", redis=cluster_url)
    async with client(dist) as c:
        old = (await c.post("/login/emil")).cookies["session"]
        c.cookies.clear()
        new = (await c.post("/login/emil", headers={"cookie": f"session={old}"})).cookies
        c.cookies.clear()
        r = await c.get("/all", headers={"cookie": f"session={old}"})
        assert r.json()["user"] == "emil"  # in its grace period
        assert (await c.post("/logout", headers={"cookie": f"session={new['session']}"})).is_success
        c.cookies.clear()
        for cookie in (old, new["session"]):
            r = await c.get("/all", headers={"cookie": f"session={cookie}"})
            assert r.json()["user"] is None
        assert await dist.sessions.list_user("emil") == []
