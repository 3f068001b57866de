"""Idle and absolute timeouts are enforced by each store (by its own clock).

The three stores run side by side in one test to keep the wall time down.  Cookies
are browser-session cookies here, so that only the store can end a session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.sessions.conftest import client

BACKENDS = ("redis", "postgres", "memory")


async def test_idle_timeout_ends_a_quiet_session_and_activity_keeps_it(
    session_dist: Callable[..., Any],
) -> None:
    async def scenario(backend: str) -> None:
        dist = await session_dist(
            backend, idle_timeout=1.0, absolute_timeout=60.0, persistent=False
        )
        async with client(dist) as c:
            await c.post("/set/k/v")
            for _ in range(3):  # 1.8 s of activity in steps well under the idle timeout
                await asyncio.sleep(0.6)
                assert (await c.get("/get/k")).json()["value"] == "v", backend
            await asyncio.sleep(1.3)  # quiet for longer than the idle timeout
            assert (await c.get("/get/k")).json()["value"] is None, backend

    await asyncio.gather(*(scenario(b) for b in BACKENDS))


async def test_absolute_timeout_ends_an_active_session(session_dist: Callable[..., Any]) -> None:
    async def scenario(backend: str) -> None:
        dist = await session_dist(backend, idle_timeout=1.0, absolute_timeout=2.0, persistent=False)
        async with client(dist) as c:
            await c.post("/set/k/v")
            for step in range(3):  # active every 0.5 s: the idle timeout never applies
                await asyncio.sleep(0.5)
                if step == 1:
                    await c.post("/set/k2/v2")  # a write does not extend it either
                assert (await c.get("/get/k")).json()["value"] == "v", backend
            await asyncio.sleep(0.8)  # 2.3 s after creation, 0.8 s after the last request
            assert (await c.get("/get/k")).json()["value"] is None, backend

    await asyncio.gather(*(scenario(b) for b in BACKENDS))


async def test_the_user_index_forgets_expired_sessions_on_its_next_access(
    session_dist: Callable[..., Any],
) -> None:
    from asgi_dist.sessions.store import user_digest

    dist = await session_dist("redis", idle_timeout=1.0, absolute_timeout=60.0)
    redis = dist.runtime.redis
    index = redis.key("session_user", user_digest("erin"))
    short, long = client(dist), client(dist)
    try:
        for c in (short, long):
            await c.post("/set/k/v")
            await c.post("/login/erin")
        assert await redis.client.scard(index) == 2
        for _ in range(3):  # keep one session active past the other's idle timeout
            await asyncio.sleep(0.5)
            await long.get("/get/k")
        assert [s.user_id for s in await dist.sessions.list_user("erin")] == ["erin"]
        assert await redis.client.scard(index) == 1  # the dead entry went on that access
    finally:
        await short.aclose()
        await long.aclose()


async def test_a_user_who_keeps_logging_in_does_not_grow_the_index_without_bound(
    session_dist: Callable[..., Any],
) -> None:
    """Each login renews the index's TTL, so it never expires by itself: logins
    forget ended sessions as they go, without anyone calling list_user."""
    from asgi_dist.sessions.store import user_digest

    dist = await session_dist("redis", idle_timeout=1.0, absolute_timeout=60.0)
    redis = dist.runtime.redis
    index = redis.key("session_user", user_digest("erin"))

    async def logins(n: int) -> None:
        for _ in range(n):
            async with client(dist) as c:  # a new browser each time
                await c.post("/set/k/v")
                await c.post("/login/erin")

    await logins(40)
    await asyncio.sleep(1.2)  # all 40 ended by their idle timeout
    await logins(40)
    assert await redis.client.scard(index) <= 48  # the 40 live ones, and few dead
    assert len(await dist.sessions.list_user("erin")) == 40


async def test_a_near_cached_copy_is_never_served_past_the_absolute_timeout(
    session_dist: Callable[..., Any],
) -> None:
    """A write keeps the writer's copy: it must not outlive the session in the store,
    which ends at the absolute timeout however recent the write."""
    from asgi_dist.sessions.store import SessionKey

    # idle = absolute = 6 s: a copy lives at most idle / 10 = 0.6 s.
    dist = await session_dist(
        "redis", near_cache=True, idle_timeout=6.0, absolute_timeout=6.0, persistent=False
    )
    async with client(dist) as c:
        await c.post("/set/k/v")
        key = SessionKey.of(c.cookies["session"].partition(".")[0].partition(":")[0])
        # Loaded now, written 5.7 s later: 0.3 s before the store ends the session.
        assert (await c.post("/set/k2/w", params={"pause": "5.7"})).status_code == 200
        for _ in range(200):  # bounded: until the store has ended it (by its own clock)
            if await dist.sessions.store.load(key) is None:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the store kept the session past its absolute timeout")
        r = await c.get("/all")
        assert r.json()["data"] == {}, "the near cache served a session the store had ended"
