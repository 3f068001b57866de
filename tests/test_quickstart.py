"""The README's first command serves the quick start, embedded or on real servers."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import SECRET_KEYS
from tests.helpers.processes import ProcessGroup


def _env(**values: str) -> dict[str, str]:
    env = {k: "" for k in os.environ if k.startswith("ASGI_DIST_")}
    env.update(values)
    return env


async def test_quickstart_serves_on_the_embedded_default(processes: ProcessGroup) -> None:
    (worker,) = processes.uvicorn("examples.quickstart:app", env=_env())
    async with httpx.AsyncClient() as client:
        first = await client.get(f"{worker.url}/")
        second = await client.get(f"{worker.url}/")
    assert first.status_code == 200, worker.output()
    assert first.json()["backend"] == "memory"
    assert [first.json()["visits"], second.json()["visits"]] == [1, 2]  # the session works
    assert first.json()["fence"] < second.json()["fence"]  # and so does the lock


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_quickstart_uses_redis_and_postgres_from_the_environment(
    processes: ProcessGroup, redis_url: str, postgres_dsn: str, namespace: str, loop: str
) -> None:
    env = _env(
        ASGI_DIST_REDIS_URL=redis_url,
        ASGI_DIST_POSTGRES_DSN=postgres_dsn,
        ASGI_DIST_NAMESPACE=namespace,
        ASGI_DIST_SECRET_KEYS=",".join(SECRET_KEYS),
    )
    # uvloop: what uvicorn runs on when installed with uvicorn[standard].
    workers = processes.uvicorn("examples.quickstart:app", n=2, env=env, loop=loop)
    async with httpx.AsyncClient() as client:
        # One browser, two processes: the session and the lock are shared through Redis.
        first = await client.get(f"{workers[0].url}/")
        second = await client.get(f"{workers[1].url}/")
    assert first.status_code == 200, workers[0].output()
    assert second.status_code == 200, workers[1].output()
    assert first.json()["backend"] == "redis"
    assert [first.json()["visits"], second.json()["visits"]] == [1, 2]
    assert first.json()["fence"] < second.json()["fence"]
