"""Real uvicorn processes on different ports share sessions through the store."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import SECRET_KEYS
from tests.helpers.processes import ProcessGroup, Worker


def _start(
    processes: ProcessGroup, backend: str, redis_url: str, postgres_dsn: str, namespace: str,
    near_cache: bool = False,
) -> list[Worker]:  # fmt: skip
    env = {
        "ASGI_DIST_REDIS_URL": redis_url,
        "ASGI_DIST_POSTGRES_DSN": postgres_dsn,
        "ASGI_DIST_NAMESPACE": namespace,
        "ASGI_DIST_SECRET_KEYS": ",".join(SECRET_KEYS),
        "SESSIONS_BACKEND": backend,
        "SESSIONS_NEAR_CACHE": "1" if near_cache else "0",
    }
    return processes.uvicorn("tests.sessions.served:app", n=2, env=env)


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
