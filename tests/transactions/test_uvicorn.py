"""Starlette, FastAPI and Quart apps under real uvicorn processes: request transactions,
outbox relays and consumers in every process, effects exactly once across the cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from asgi_dist import Dist
from tests.helpers.processes import ProcessGroup
from tests.transactions.waiting import eventually


@pytest.mark.parametrize("framework", ["starlette", "fastapi", "quart"])
async def test_orders_across_uvicorn_processes_are_committed_published_and_handled_once(
    make_dist: Callable[..., Any],
    pg: asyncpg.Connection,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    framework: str,
) -> None:
    # This Dist only creates the tables (migrations) and is stopped before the servers run.
    dist: Dist = await make_dist()
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_orders (id int PRIMARY KEY, pid int)")
    await pg.execute(f"CREATE TABLE {ns}_effects (msg_id uuid, key text, n int, pid int)")
    await dist.stop()
    env = {
        "ASGI_DIST_REDIS_URL": redis_url,
        "ASGI_DIST_POSTGRES_DSN": postgres_dsn,
        "ASGI_DIST_NAMESPACE": ns,
        "FRAMEWORK": framework,
    }
    servers = processes.uvicorn("tests.transactions.app:app", 2, env)
    async with httpx.AsyncClient(timeout=10) as http:
        calls = [
            http.post(f"{servers[i % 2].url}/orders/{i}", params={"fail": 1} if i % 5 == 0 else {})
            for i in range(100)
        ]
        responses = await asyncio.gather(*calls)
    statuses = [r.status_code for r in responses]
    assert statuses == [500 if i % 5 == 0 else 201 for i in range(100)], servers[0].output()
    ok = {i for i in range(100) if i % 5}
    # Committed before the 201 was sent: visible at once, from both processes.
    rows = await pg.fetch(f"SELECT id, pid FROM {ns}_orders")
    assert {r["id"] for r in rows} == ok
    assert {r["pid"] for r in rows} == {s.pid for s in servers}

    async def handled() -> bool:
        n: int = await pg.fetchval(f"SELECT count(*) FROM {ns}_effects")
        return n >= len(ok)

    await eventually(handled, 30, "every order handled")
    await asyncio.sleep(0.3)  # room for a duplicate to show
    effects = await pg.fetch(f"SELECT n FROM {ns}_effects")
    assert sorted(r["n"] for r in effects) == sorted(ok)
    for server in servers:
        # Lifespan shutdown stops the relay and consumers without a traceback.
        assert server.terminate() in (0, -15), server.output()
        assert "Traceback" not in server.output(), server.output()
