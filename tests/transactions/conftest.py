"""Fixtures of the transaction tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from tests.transactions.proxy import TcpProxy, proxied
from tests.transactions.settings import FAST


@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database, outside any Dist."""
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def pg_proxy(postgres_dsn: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """(proxy, dsn through it): ``await proxy.cut()`` makes PostgreSQL unreachable."""
    async with proxied(postgres_dsn, 5432) as (proxy, dsn):
        yield proxy, dsn


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """(proxy, Redis URL through it): ``proxy.black_hole()`` makes Redis stop answering."""
    async with proxied(redis_url, 6379) as (proxy, url):
        yield proxy, url


@pytest.fixture
def fast_dist(make_dist: Callable[..., Any]) -> Callable[..., Any]:
    async def factory(**overrides: Any) -> Any:
        overrides.setdefault("transactions", FAST)
        # Check-back and purge are scheduler jobs run by the leader: a killed leader
        # must be replaced within a test's budget.
        overrides.setdefault("leader_ttl", 2.0)
        return await make_dist(**overrides)

    return factory
