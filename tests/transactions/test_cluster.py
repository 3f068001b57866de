"""The outbox, consumers and dead letters on a real Redis Cluster (streams on several slots)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

from asgi_dist import Dist
from asgi_dist.transactions import Message, Transaction
from tests.transactions.waiting import eventually

TOPICS = ["orders.created", "orders.paid", "orders.shipped"]


async def test_relay_consumers_and_dead_letters_work_on_redis_cluster(
    fast_dist: Callable[..., Any], pg: asyncpg.Connection, cluster_url: str
) -> None:
    dist: Dist = await fast_dist(redis=cluster_url)
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_effects (topic text, msg_id uuid)")

    for topic in TOPICS:

        @dist.consumer(topic, group="g", concurrency=4, max_deliveries=2)
        async def handle(message: Message, tx: Transaction) -> None:
            if message.payload.get("poison"):
                raise ValueError("poison")
            await tx.execute(f"INSERT INTO {ns}_effects VALUES ($1, $2)", message.topic, message.id)

    pool = dist.runtime.require_postgres("test").pool
    async with pool.acquire() as conn, conn.transaction():
        tx = Transaction(dist.transactions.outbox, conn)
        for i in range(90):
            await tx.publish(TOPICS[i % 3], {"i": i}, key=f"k{i % 7}")
        await tx.publish("orders.paid", {"poison": True})

    async def handled() -> bool:
        return bool(await pg.fetchval(f"SELECT count(*) FROM {ns}_effects") >= 90)

    await eventually(handled, 20, "90 effects")
    client: Any = dist.runtime.require_redis("test").client
    dead = f"{{{ns}:topic:orders.paid}}:dead:g"

    async def dead_lettered() -> bool:
        return bool(await client.xlen(dead) == 1)

    await eventually(dead_lettered, 20, "poison dead-lettered")
    rows = await pg.fetch(
        f"SELECT topic, count(DISTINCT msg_id) AS d, count(*) AS c FROM {ns}_effects GROUP BY topic"
    )
    assert {r["topic"]: (r["d"], r["c"]) for r in rows} == {t: (30, 30) for t in TOPICS}
