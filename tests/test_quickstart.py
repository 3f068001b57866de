"""The README's first command serves the quick start, embedded or on real servers."""

from __future__ import annotations

import os

import httpx

from tests.conftest import SECRET_KEYS
from tests.helpers.processes import ProcessGroup


def _env(**values: str) -> dict[str, str]:
    env = {k: "" for k in os.environ if k.startswith("ASGI_DIST_")}
    env.update(values)
    return env


async def test_quickstart_serves_on_the_embedded_default(processes: ProcessGroup) -> None:
    (worker,) = processes.uvicorn("examples.quickstart:app", env=_env())
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{worker.url}/")
    assert response.status_code == 200, worker.output()
    assert response.json()["backend"] == "memory"


async def test_quickstart_uses_redis_and_postgres_from_the_environment(
    processes: ProcessGroup, redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    env = _env(
        ASGI_DIST_REDIS_URL=redis_url,
        ASGI_DIST_POSTGRES_DSN=postgres_dsn,
        ASGI_DIST_NAMESPACE=namespace,
        ASGI_DIST_SECRET_KEYS=",".join(SECRET_KEYS),
    )
    (worker,) = processes.uvicorn("examples.quickstart:app", env=env)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{worker.url}/")
    assert response.status_code == 200, worker.output()
    assert response.json()["backend"] == "redis"
