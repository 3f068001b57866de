"""Scheduler test helpers: Dists with only the capabilities these tests exercise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from asgi_dist import Dist
from asgi_dist.transactions import TransactionConfig
from tests.transactions.proxy import TcpProxy, proxied


@pytest.fixture
def sched_dist(make_dist: Any) -> Any:
    """``await sched_dist(**overrides)``: a started Dist without sessions and transactions
    (their workers are not under test here), leader_ttl 2 s for quick failover."""

    async def factory(**overrides: Any) -> Dist:
        kwargs: dict[str, Any] = {
            "sessions": False,
            "transactions": TransactionConfig(enabled=False),
            "leader_ttl": 2.0,
        }
        kwargs.update(overrides)
        dist: Dist = await make_dist(**kwargs)
        return dist

    return factory


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """(proxy, Redis URL through it): ``proxy.black_hole()`` makes Redis stop answering."""
    async with proxied(redis_url, 6379) as (proxy, url):
        yield proxy, url
