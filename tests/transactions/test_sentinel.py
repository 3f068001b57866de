"""The relay and a consumer through Redis Sentinel (the client finds the primary by asking)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

from asgi_dist import Dist
from asgi_dist.transactions import Message, Transaction
from tests.helpers.servers import redis_sentinel
from tests.transactions.waiting import eventually


async def test_relay_and_consumer_work_through_redis_sentinel(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, namespace: str
) -> None:
    with redis_sentinel("mymaster") as (primary, sentinel):
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
        dist: Dist = await fast_dist(redis=url, sessions=False)
        await pg.execute(f"CREATE TABLE {namespace}_effects (msg_id uuid, n int)")

        @dist.consumer("work", group="g", concurrency=2)
        async def handle(message: Message, tx: Transaction) -> None:
            await tx.execute(
                f"INSERT INTO {namespace}_effects VALUES ($1, $2)", message.id, message.payload["n"]
            )

        pool = dist.runtime.require_postgres("test").pool
        async with pool.acquire() as conn, conn.transaction():
            tx = Transaction(dist.transactions.outbox, conn)
            ids = [await tx.publish("work", {"n": n}, key=f"k{n % 3}") for n in range(50)]

        async def handled() -> bool:
            n: int = await pg.fetchval(f"SELECT count(*) FROM {namespace}_effects")
            return n >= 50

        await eventually(handled, 20, "50 effects through Sentinel")
        rows = await pg.fetch(f"SELECT msg_id, n FROM {namespace}_effects")
        assert sorted(str(r["msg_id"]) for r in rows) == sorted(ids)  # each exactly once
        # The stream lives on the primary that Sentinel named.
        stream = f"{{{namespace}:topic:work}}:stream"
        assert primary.cli("XLEN", stream) == "50"
        await dist.stop()  # before the servers go away
