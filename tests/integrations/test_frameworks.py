"""The same middleware in Starlette, FastAPI and Quart, served by real uvicorn processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from asgi_dist import ConfigError, Dist
from asgi_dist.integrations.fastapi import TxDep
from tests.helpers.processes import ProcessGroup


@pytest.mark.parametrize(
    ("framework", "server"),
    [
        ("starlette", "uvicorn"),
        ("fastapi", "uvicorn"),
        ("quart", "uvicorn"),
        ("quart", "hypercorn"),  # Quart's own server
        ("starlette", "hypercorn"),
    ],
)
async def test_lifespan_starts_and_stops_the_dist_once_per_process(
    framework: str, server: str, processes: ProcessGroup, tmp_path: Path
) -> None:
    events = tmp_path / "events.txt"
    env = {"FRAMEWORK": framework, "EVENTS_FILE": str(events)}
    serve = processes.hypercorn if server == "hypercorn" else processes.uvicorn
    workers = serve("tests.apps.frameworks:app", n=2, env=env)
    async with httpx.AsyncClient() as client:
        for worker in workers:
            for _ in range(3):
                response = await client.get(f"{worker.url}/status")
                assert response.status_code == 200, worker.output()
                assert response.json() == {"started": True, "starts": 1, "path": "/status"}
    for worker in workers:
        # A graceful shutdown (uvicorn then re-raises SIGTERM to report it).
        assert worker.terminate() in (0, -15), worker.output()
    lines = sorted(events.read_text().splitlines())
    # hypercorn serves from a child process of the one started: count the pids seen.
    pids = {line.split()[1] for line in lines}
    assert len(pids) == len(workers)
    assert lines == sorted(f"{what} {pid}" for pid in pids for what in ("start", "stop"))
    if server == "uvicorn":
        assert pids == {str(w.pid) for w in workers}


async def test_fastapi_dependencies_resolve_inside_a_request() -> None:
    dist = Dist()  # no PostgreSQL: get_tx() must say so clearly
    api = FastAPI()

    @api.get("/tx")
    async def uses_tx(tx: TxDep) -> dict[str, str]:
        return {"tx": type(tx).__name__}

    transport = httpx.ASGITransport(app=dist.wrap(api))
    async with dist, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(ConfigError, match="get_tx\\(\\) needs PostgreSQL"):
            await client.get("/tx")


async def test_locked_names_the_lock_by_the_converted_fastapi_parameter() -> None:
    """/orders/05/pay and /orders/5/pay both give the endpoint order_id=5: one lock."""
    dist = Dist()
    api = FastAPI()
    entered, go_on = asyncio.Event(), asyncio.Event()

    @api.post("/orders/{order_id}/pay")
    @dist.locked("order:{order_id}", timeout=0)
    async def pay(order_id: int) -> dict[str, int]:
        entered.set()
        await go_on.wait()
        return {"order_id": order_id}

    transport = httpx.ASGITransport(app=dist.wrap(api))
    async with dist, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = asyncio.create_task(client.post("/orders/5/pay"))
        await asyncio.wait_for(entered.wait(), 5)
        try:  # bounded: with two locks, the second request would wait for go_on too
            second = await asyncio.wait_for(client.post("/orders/05/pay"), 10)
        finally:
            go_on.set()
        assert (await first).json() == {"order_id": 5}
    assert second.status_code == 409, second.text
    assert "Retry-After" in second.headers
