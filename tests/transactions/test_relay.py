"""The relay: fenced partition leases, per-key order, purge after retention."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.transactions import Transaction
from asgi_dist.transactions.relay import Refused, Relay
from tests.transactions.settings import FAST
from tests.transactions.waiting import eventually


async def publish(dist: Dist, n: int, key: str | None) -> list[str]:
    pool = dist.runtime.require_postgres("test").pool
    async with pool.acquire() as conn, conn.transaction():
        tx = Transaction(dist.transactions.outbox, conn)
        return [await tx.publish("work", {"n": i}, key=key) for i in range(n)]


def relay(dist: Dist, node: str) -> Relay:
    return Relay(
        dist.runtime.require_postgres("test"),
        dist.runtime.require_redis("test"),
        dist.transactions.config,
        node,
        asyncio.Event(),
    )


async def test_a_relay_paused_past_its_lease_cannot_mark_rows_it_no_longer_owns(
    make_dist: Callable[..., Any], pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    # No background relay: the test drives two relays step by step.
    dist: Dist = await make_dist(transactions=replace(FAST, relay=False, relay_lease=0.5))
    ids = await publish(dist, 10, key="order-1")
    slow, fast = relay(dist, "slow"), relay(dist, "fast")
    claimed = await slow.claim()
    assert claimed is not None
    claim, rows = claimed
    slow_ids = await slow.xadd(rows)
    await asyncio.sleep(0.8)  # "paused" past its lease between XADD and marking
    assert await fast.relay_once() == 10  # the partition changed owner (new fence)
    assert await slow.mark(claim, rows, slow_ids) == 0  # refused: stale fence
    stored = {
        r["stream_id"] for r in await pg.fetch(f"SELECT stream_id FROM {dist.namespace}_outbox")
    }
    assert stored.isdisjoint(slow_ids)  # the rows name the new owner's entries
    entries = await redis_client.xrange(f"{{{dist.namespace}:topic:work}}:stream")
    # Published twice (consumers dedupe by id), and in order each time.
    firsts = []
    for _, fields in entries:
        if fields[b"id"].decode() not in firsts:
            firsts.append(fields[b"id"].decode())
    assert firsts == ids
    assert [json.loads(f[b"payload"])["n"] for _, f in entries] == list(range(10)) * 2


async def test_rows_of_one_key_leave_in_publish_order(
    fast_dist: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    dist: Dist = await fast_dist()
    ids: list[str] = []
    for _ in range(5):
        ids += await publish(dist, 40, key="same")
    stream = f"{{{dist.namespace}:topic:work}}:stream"

    async def relayed() -> bool:
        return bool(await redis_client.xlen(stream) >= 200)

    await eventually(relayed, 10, "200 entries")
    entries = await redis_client.xrange(stream)
    assert [f[b"id"].decode() for _, f in entries] == ids


async def test_published_rows_are_purged_after_retention(
    make_dist: Callable[..., Any], pg: asyncpg.Connection
) -> None:
    config = replace(FAST, retention=0.3, purge_interval=0.2)
    dist: Dist = await make_dist(transactions=config)
    await publish(dist, 20, key=None)

    async def purged() -> bool:
        return bool(await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_outbox") == 0)

    await eventually(purged, 10, "published rows purged")


async def test_a_backlog_of_large_messages_is_relayed_in_batches_of_bounded_size(
    make_dist: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    """60 messages of 200 KB on one key (one partition): a claim reads a few megabytes of
    them, not all 12 MB at once (500 rows of max_payload would be 128 MB in memory),
    and the rows still leave in order."""
    dist: Dist = await make_dist(transactions=replace(FAST, relay=False))
    pool = dist.runtime.require_postgres("test").pool
    big = "x" * 200_000
    async with pool.acquire() as conn, conn.transaction():
        tx = Transaction(dist.transactions.outbox, conn)
        ids = [await tx.publish("work", {"n": i, "data": big}, key="same") for i in range(60)]
    one = relay(dist, "one")
    claimed = await one.claim()
    assert claimed is not None
    _, rows = claimed
    held = sum(len(r["payload"]) for r in rows)
    assert 0 < held <= 4 * 1024 * 1024 + 200_100, f"{len(rows)} rows, {held} bytes in one claim"
    # Give the lease back, then relay the whole backlog batch by batch.
    await one.mark(claimed[0], [], [])
    batches = []
    while relayed := await one.relay_once():
        batches.append(relayed)
    assert sum(batches) == 60 and len(batches) >= 3, batches
    entries = await redis_client.xrange(f"{{{dist.namespace}:topic:work}}:stream")
    assert [f[b"id"].decode() for _, f in entries] == ids


async def test_rows_redis_refuses_do_not_make_the_others_publish_again_and_again(
    make_dist: Callable[..., Any], pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    """One topic's stream key holds a string (WRONGTYPE): its row waits in the outbox,
    while the rows relayed in the same batches are published once, not at every retry."""

    dist: Dist = await make_dist(transactions=replace(FAST, relay=False))
    ns = dist.namespace
    bad = f"{{{ns}:topic:bad}}:stream"
    await redis_client.set(bad, "not a stream")
    pool = dist.runtime.require_postgres("test").pool
    async with pool.acquire() as conn, conn.transaction():
        tx = Transaction(dist.transactions.outbox, conn)
        first = [await tx.publish("work", {"n": i}, key="same") for i in range(3)]
        await tx.publish("bad", {"n": 0}, key="same")
        last = [await tx.publish("work", {"n": i}, key="same") for i in range(3, 5)]
    one = relay(dist, "one")
    for _ in range(3):
        with pytest.raises(Refused, match=r"topic 'bad'.*WRONGTYPE"):
            await one.relay_once()
    entries = await redis_client.xrange(f"{{{ns}:topic:work}}:stream")
    assert [f[b"id"].decode() for _, f in entries] == first + last
    waiting = await pg.fetch(f"SELECT topic FROM {ns}_outbox WHERE published_at IS NULL")
    assert [r["topic"] for r in waiting] == ["bad"]
    await redis_client.delete(bad)  # the cause fixed: the row leaves
    assert await one.relay_once() == 1
    assert await redis_client.xlen(bad) == 1
