"""Real uvicorn processes on different ports share sessions through the store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import SECRET_KEYS
from tests.helpers.processes import ProcessGroup, Worker


def _start(
    processes: ProcessGroup, backend: str, redis_url: str, postgres_dsn: str, namespace: str,
    near_cache: bool = False, n: int = 2,
) -> list[Worker]:  # fmt: skip
    env = {
        "ASGI_DIST_REDIS_URL": redis_url,
        "ASGI_DIST_POSTGRES_DSN": postgres_dsn,
        "ASGI_DIST_NAMESPACE": namespace,
        "ASGI_DIST_SECRET_KEYS": ",".join(SECRET_KEYS),
        "SESSIONS_BACKEND": backend,
        "SESSIONS_NEAR_CACHE": "1" if near_cache else "0",
    }
    return processes.uvicorn("tests.sessions.served:app", n=n, env=env)


@pytest.mark.parametrize(
    ("backend", "near_cache"), [("redis", False), ("redis", True), ("postgres", False)]
)
async def test_two_processes_share_a_session_and_lose_no_concurrent_update(
    backend: str,
    near_cache: bool,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    namespace: str,
) -> None:
    a, b = _start(processes, backend, redis_url, postgres_dsn, namespace, near_cache)
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{a.url}/set/seed/0")
        cookie = {"cookie": f"session={r.cookies['session']}"}
        r = await http.get(f"{b.url}/get/seed", headers=cookie)
        assert r.json()["value"] == "0" and r.json()["pid"] == b.pid
        # 40 overlapping requests, alternating between the processes, each its own key.
        writes = [http.post(f"{(a, b)[i % 2].url}/set/k{i}/{i}", headers=cookie) for i in range(40)]
        assert all(r.status_code == 200 for r in await asyncio.gather(*writes))
        expected = {"seed": "0", **{f"k{i}": str(i) for i in range(40)}}
        for worker in (a, b):
            r = await http.get(f"{worker.url}/all", headers=cookie)
            assert r.json()["data"] == expected


async def test_near_cache_a_write_through_one_process_is_seen_by_the_next_request_to_another(
    processes: ProcessGroup, redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    a, b = _start(processes, "redis", redis_url, postgres_dsn, namespace, near_cache=True)
    # One cookie jar for both ports, as a browser behind a load balancer: each write's
    # cookie carries the session's version, so no node serves a copy older than it.
    async with httpx.AsyncClient(timeout=10) as browser:
        await browser.post(f"{a.url}/set/n/0")
        for i in range(1, 31):
            # The writer alternates, so both processes keep copies of their own writes.
            writer, reader = (a, b) if i % 2 else (b, a)
            # The reader reads twice: the second read is served from its near cache.
            for _ in range(2):
                r = await browser.get(f"{reader.url}/get/n")
                assert r.json()["value"] == str(i - 1)
            assert (await browser.post(f"{writer.url}/set/n/{i}")).status_code == 200
            for worker in (reader, writer):
                r = await browser.get(f"{worker.url}/get/n")
                assert r.json()["value"] == str(i), f"pid {worker.pid}: stale copy at round {i}"
        for worker in (a, b):
            assert (await browser.get(f"{worker.url}/near-cache")).json()["hits"] >= 15


async def test_a_logout_through_a_process_without_near_cache_reaches_the_near_cached_ones(
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    namespace: str,
    session_dist: Callable[..., Any],
) -> None:
    """An admin script or a node configured without the near cache ends sessions too:
    the near-caching nodes must hear of it, not serve the ended session on."""
    (cached,) = _start(processes, "redis", redis_url, postgres_dsn, namespace, True, n=1)
    (plain,) = _start(processes, "redis", redis_url, postgres_dsn, namespace, False, n=1)
    script = await session_dist("redis")  # this process: no near cache, no requests
    async with httpx.AsyncClient(timeout=10) as http:

        async def call(method: str, url: str, cookie: str | None = None) -> httpx.Response:
            http.cookies.clear()  # one browser per user: only the cookie given is sent
            headers = {"cookie": f"session={cookie}"} if cookie else {}
            return await http.request(method, url, headers=headers)

        async def login(uid: str) -> str:
            cookie: str = (await call("POST", f"{cached.url}/login/{uid}")).cookies["session"]
            for _ in range(2):  # the second read is served from the near cache
                assert (await call("GET", f"{cached.url}/all", cookie)).json()["user"] == uid
            return cookie

        ended = {"data": {}, "user": None, "pid": cached.pid}
        frank, grace, heidi = await login("frank"), await login("grace"), await login("heidi")
        hits = (await call("GET", f"{cached.url}/near-cache")).json()["hits"]
        assert hits >= 3
        # Logout through the other node.
        assert (await call("POST", f"{plain.url}/logout", frank)).status_code == 200
        assert (await call("GET", f"{cached.url}/all", frank)).json() == ended
        # Logout everywhere from a script.
        assert await script.sessions.invalidate_user("grace") == 1
        assert (await call("GET", f"{cached.url}/all", grace)).json() == ended
        # A new login through the other node moves the session to a new id: the old
        # one is readable (read-only) for its grace period, from the store.
        assert (await call("POST", f"{plain.url}/login/ivan", heidi)).status_code == 200
        assert (await call("GET", f"{cached.url}/all", heidi)).json()["user"] == "heidi"
        assert (await call("GET", f"{cached.url}/near-cache")).json()["hits"] == hits
