"""Session test fixtures: an app per Dist, an HTTP client on it, and a round-trip counter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig
from asgi_dist.sessions import SessionConfig
from tests.sessions.app import build


class CountingRedis(aioredis.Redis):
    """A real client that counts the commands it sends (each is one round trip here:
    the session code sends no pipelines)."""

    round_trips = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        return await super().execute_command(*args, **options)


@pytest.fixture
async def counting_redis(redis_url: str) -> AsyncIterator[CountingRedis]:
    client = CountingRedis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def session_dist(make_dist: Callable[..., Any]) -> Callable[..., Any]:
    """``await session_dist(backend, **session_options, **dist_overrides)``."""

    async def factory(backend: str = "redis", **options: Any) -> Dist:
        dist_keys = {"redis", "postgres", "secret_keys", "namespace", "start", "scheduler"}
        overrides = {k: options.pop(k) for k in list(options) if k in dist_keys}
        if backend == "memory":
            overrides.setdefault("redis", None)
            overrides.setdefault("postgres", None)
        # These tests need no scheduler: keep its leader campaign out of them.
        overrides.setdefault("scheduler", SchedulerConfig(enabled=False))
        config = SessionConfig(backend=backend, **options)  # type: ignore[arg-type]
        dist: Dist = await make_dist(sessions=config, **overrides)
        return dist

    return factory


def client(dist: Dist, base_url: str = "http://testserver") -> httpx.AsyncClient:
    """An HTTP client on the session test app of ``dist`` (already started)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build(dist)), base_url=base_url)


def set_cookie(response: httpx.Response) -> str | None:
    values = response.headers.get_list("set-cookie")
    assert len(values) <= 1, values
    return values[0] if values else None
