"""Fixtures of the transaction tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.transactions.proxy import TcpProxy
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
    parts = urlsplit(postgres_dsn)
    proxy = await TcpProxy(parts.port or 5432, parts.hostname or "127.0.0.1").start()
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    dsn = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
    yield proxy, dsn
    await proxy.cut()


@pytest.fixture
def fast_dist(make_dist: Callable[..., Any]) -> Callable[..., Any]:
    async def factory(**overrides: Any) -> Any:
        overrides.setdefault("transactions", FAST)
        # Check-back and purge are scheduler jobs run by the leader: a killed leader
        # must be replaced within a test's budget.
        overrides.setdefault("leader_ttl", 2.0)
        return await make_dist(**overrides)

    return factory
