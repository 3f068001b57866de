"""Every redis-py connection has a read timeout, and the blocking reads fit under it.

A Redis that stops answering without closing its connections (packets dropped, a
partition): the relay and the consumers give up on those connections within the read
timeout and resume by themselves once Redis answers again, each message handled once.
A consumer whose claim_interval is longer than the read timeout still blocks in its
reads (for less than it) without timing out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from asgi_dist import Dist
from asgi_dist.transactions import Message, Transaction
from tests.transactions.proxy import TcpProxy
from tests.transactions.settings import FAST
from tests.transactions.waiting import eventually

CONNECT_TIMEOUT = 1.0
# The longest a reply may take, backends.redis.read_timeout(CONNECT_TIMEOUT): the connect
# timeout plus the longest blocking read (tests/backends/test_redis.py checks it).
BOUND = 5.0


async def test_relay_and_consumer_resume_after_redis_stopped_answering(
    redis_proxy: tuple[TcpProxy, str], fast_dist: Callable[..., Any], pg: asyncpg.Connection
) -> None:
    # The proxy first: it outlives the Dist, which stops while Redis answers.
    proxy, url = redis_proxy
    dist: Dist = await fast_dist(redis=url, connect_timeout=CONNECT_TIMEOUT)
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (msg_id uuid)")

    @dist.consumer("stalls", group="g", concurrency=4)
    async def handle(message: Message, tx: Transaction) -> None:
        await tx.execute(f"INSERT INTO {ns}_effects VALUES ($1)", message.id)

    async def publish(n: int) -> None:
        # Straight to PostgreSQL: only Redis is behind the proxy.
        async with pg.transaction():
            tx = Transaction(dist.transactions.outbox, pg)
            for i in range(n):
                await tx.publish("stalls", {"i": i}, key=f"k{i % 3}")

    async def handled() -> int:
        return int(await pg.fetchval(f"SELECT count(DISTINCT msg_id) FROM {ns}_effects"))

    async def handled_is(n: int) -> bool:
        return await handled() == n

    await publish(5)
    await eventually(lambda: handled_is(5), 15, "the first 5 handled")

    # Every connection to Redis open now (the relay's, the consumer's blocking read, the
    # pool's idle ones) and every new one goes silent, for longer than the read timeout.
    proxy.black_hole()
    await publish(5)
    await asyncio.sleep(BOUND + 2.0)
    assert await handled() == 5  # nothing got through meanwhile

    proxy.heal()
    await publish(5)
    # Well within a minute: the loops notice within BOUND, then retry with backoff.
    await eventually(lambda: handled_is(15), 25, "all 15 handled after Redis answered again")
    await asyncio.sleep(0.5)  # a late duplicate would show here
    assert await pg.fetchval(f"SELECT count(*) FROM {ns}_effects") == 15
    unpublished = f"SELECT count(*) FROM {ns}_outbox WHERE published_at IS NULL"
    await eventually(lambda: _is_zero(pg.fetchval(unpublished)), 10, "the outbox relayed")


async def test_a_claim_interval_longer_than_the_read_timeout_reads_without_timing_out(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """The idle read blocks for claim_interval at most, capped below the read timeout: a
    read that timed out would log, drop its connection and back off, and a message
    published meanwhile would wait for the next read."""
    config = replace(FAST, claim_interval=BOUND + 3.0, reclaim_after=60.0)
    dist: Dist = await fast_dist(connect_timeout=CONNECT_TIMEOUT, transactions=config)
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (msg_id uuid)")

    @dist.consumer("idle", group="g")
    async def handle(message: Message, tx: Transaction) -> None:
        await tx.execute(f"INSERT INTO {ns}_effects VALUES ($1)", message.id)

    async def publish() -> None:
        async with pg.transaction():
            await Transaction(dist.transactions.outbox, pg).publish("idle", {})

    async def handled_is(n: int) -> bool:
        return bool(await pg.fetchval(f"SELECT count(*) FROM {ns}_effects") == n)

    caplog.set_level(logging.WARNING, logger="asgi_dist.transactions")
    await publish()
    await eventually(lambda: handled_is(1), 10, "the first message handled")
    await asyncio.sleep(BOUND + 2.0)  # idle, in blocking reads
    await publish()
    await eventually(lambda: handled_is(2), 2, "a message published to an idle consumer")
    complaints = [r.getMessage() for r in caplog.records if r.name == "asgi_dist.transactions"]
    assert complaints == []


async def _is_zero(value: Any) -> bool:
    return bool(await value == 0)
