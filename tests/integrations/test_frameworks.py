"""The same middleware in Starlette, FastAPI and Quart, served by real uvicorn processes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from asgi_dist import Dist, NoRequestContext
from asgi_dist.integrations.fastapi import TxDep
from tests.helpers.processes import ProcessGroup


@pytest.mark.parametrize("framework", ["starlette", "fastapi", "quart"])
async def test_lifespan_starts_and_stops_the_dist_once_per_process(
    framework: str, processes: ProcessGroup, tmp_path: Path
) -> None:
    events = tmp_path / "events.txt"
    env = {"FRAMEWORK": framework, "EVENTS_FILE": str(events)}
    workers = processes.uvicorn("tests.apps.frameworks:app", n=2, env=env)
    async with httpx.AsyncClient() as client:
        for worker in workers:
            for _ in range(3):
                response = await client.get(f"{worker.url}/status")
                assert response.status_code == 200, worker.output()
                assert response.json() == {"started": True, "starts": 1, "path": "/status"}
    for worker in workers:
        # uvicorn shuts down gracefully, then re-raises SIGTERM to report it.
        assert worker.terminate() in (0, -15), worker.output()
    lines = sorted(events.read_text().splitlines())
    expected = sorted(f"{what} {w.pid}" for w in workers for what in ("start", "stop"))
    assert lines == expected


async def test_fastapi_dependencies_resolve_inside_a_request() -> None:
    dist = Dist()  # no PostgreSQL: get_tx() must say so clearly
    api = FastAPI()

    @api.get("/tx")
    async def uses_tx(tx: TxDep) -> dict[str, str]:
        return {"tx": type(tx).__name__}

    transport = httpx.ASGITransport(app=dist.wrap(api))
    async with dist, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(NoRequestContext, match="get_tx\\(\\) needs PostgreSQL"):
            await client.get("/tx")
