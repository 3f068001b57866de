"""A pool passed in must leave the relay a connection beside the one it holds in LISTEN."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from asgi_dist import ConfigError, Dist
from asgi_dist.transactions import TransactionConfig


async def test_a_pool_of_one_connection_is_refused_at_start_instead_of_deadlocking_the_relay(
    make_dist: Callable[..., Any], postgres_dsn: str
) -> None:
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(ConfigError, match=r"max_size=1.*LISTEN.*max_size >= 2") as raised:
            await make_dist(postgres=pool, sessions=False)
        assert "TransactionConfig(relay=False)" in str(raised.value)
        # Refused before anything took the pool's connection for good.
        async with asyncio.timeout(2):
            assert await pool.fetchval("SELECT 1") == 1
        # Without a relay there is nothing to hold a connection for good: it starts.
        dist: Dist = await make_dist(
            postgres=pool, sessions=False, transactions=TransactionConfig(relay=False)
        )
        assert dist.started and dist.transactions.relay is None
        async with asyncio.timeout(2):
            assert await pool.fetchval("SELECT 1") == 1
        await dist.stop()
    finally:
        await pool.close()


async def test_a_pool_of_two_serves_the_relay_and_postgres_lock_waiters_without_deadlock(
    make_dist: Callable[..., Any], postgres_dsn: str
) -> None:
    # The relay holds one connection in LISTEN; a lock waiter's LISTEN would take
    # the other for good and leave none for the lock's own statements.
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
    try:
        holder: Dist = await make_dist(redis=None, sessions=False)
        dist: Dist = await make_dist(postgres=pool, sessions=False)
        assert dist.transactions.relay is not None
        held = await holder.lock("k", ttl=30, backend="postgres").acquire()
        waiting = asyncio.create_task(dist.lock("k", backend="postgres").acquire(timeout=20))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        async with asyncio.timeout(5):
            assert await pool.fetchval("SELECT 1") == 1
            await held.release()
            second = await waiting
        assert second.fence > held.fence
        await second.release()
        await dist.stop()
    finally:
        await pool.close()
