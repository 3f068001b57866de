"""Shared fixtures: the real Redis and PostgreSQL, a random namespace per test,
private servers for chaos tests, and real OS processes.

Servers come from ``ASGI_DIST_TEST_REDIS_URL`` / ``ASGI_DIST_TEST_POSTGRES_DSN``
(default: the standard local ports).  Each run gets a fresh PostgreSQL database,
dropped afterwards; each test gets its own namespace, so runs can share servers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from asgi_dist import Dist
from tests.helpers.processes import ProcessGroup
from tests.helpers.servers import RedisServer, redis_cluster

REDIS_URL = os.environ.get("ASGI_DIST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_ADMIN_DSN = os.environ.get(
    "ASGI_DIST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SECRET_KEYS = ["test-secret-key-newest-0123456789", "test-secret-key-older-0123456789"]


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def redis_url() -> str:
    async def ping() -> None:
        client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(ping())
    except Exception as exc:
        pytest.exit(f"the test Redis at {REDIS_URL} is unreachable ({exc}); start it", 2)
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A fresh database for this test run, dropped afterwards."""
    database = f"asgi_dist_test_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{database}"'))
    except Exception as exc:
        pytest.exit(f"the test PostgreSQL at {POSTGRES_ADMIN_DSN} is unusable ({exc})", 2)
    yield _with_database(POSTGRES_ADMIN_DSN, database)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


_namespaces: set[str] = set()


@pytest.fixture
def namespace() -> str:
    ns = f"t_{secrets.token_hex(6)}"
    _namespaces.add(ns)
    return ns


@pytest.fixture(scope="session", autouse=True)
def _clean_shared_redis() -> Iterator[None]:
    """Remove this run's keys from the shared Redis when the run ends (its database
    on the shared PostgreSQL is dropped by ``postgres_dsn``)."""
    yield
    if not _namespaces:
        return

    async def clean() -> None:
        client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        try:
            ours = []
            for pattern in ("{t_*", "t_*"):
                async for key in client.scan_iter(pattern, count=1000):
                    if key.decode(errors="replace").lstrip("{")[:14] in _namespaces:
                        ours.append(key)
            for i in range(0, len(ours), 500):
                await client.unlink(*ours[i : i + 500])
        finally:
            await client.aclose()

    try:
        asyncio.run(clean())
    except Exception as exc:  # cleanup must never fail the run
        print(f"could not clean the test keys from {REDIS_URL}: {exc}")


@pytest.fixture
async def make_dist(
    redis_url: str, postgres_dsn: str, namespace: str
) -> AsyncIterator[Callable[..., Any]]:
    """``await make_dist(**overrides)`` -> a started Dist on the shared servers.

    Defaults: the test Redis and PostgreSQL, this test's namespace, the test keys.
    Pass ``redis=None`` / ``postgres=None`` to leave one out, ``start=False`` to
    get it unstarted.  Every Dist is stopped when the test ends.
    """
    made: list[Dist] = []

    async def factory(*, start: bool = True, **overrides: Any) -> Dist:
        kwargs: dict[str, Any] = {
            "redis": redis_url,
            "postgres": postgres_dsn,
            "namespace": namespace,
            "secret_keys": SECRET_KEYS,
        }
        kwargs.update(overrides)
        dist = Dist(**kwargs)
        made.append(dist)
        if start:
            await dist.start()
        return dist

    yield factory
    for dist in reversed(made):
        await dist.stop()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path)
    yield group
    group.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server this test may kill, pause and restart."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A private 3-master Redis Cluster for the whole run."""
    with redis_cluster(3) as nodes:
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
