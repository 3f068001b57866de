"""A Redis that stops answering without closing its connections (packets dropped, a
partition): the scheduler's store calls and its blocking dispatch reads give up on
those connections within the read timeout, and jobs fire again once Redis answers."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from asgi_dist.scheduling import JobContext
from tests.transactions.proxy import TcpProxy

CONNECT_TIMEOUT = 1.0
# The longest a reply may take, backends.redis.read_timeout(CONNECT_TIMEOUT): the connect
# timeout plus the longest blocking read (tests/backends/test_redis.py checks it).
BOUND = 5.0


async def test_jobs_fire_again_after_redis_stopped_answering(
    redis_proxy: tuple[TcpProxy, str], sched_dist: Any
) -> None:
    # The proxy first: it outlives the Dist, which stops while Redis answers.
    proxy, url = redis_proxy
    dist = await sched_dist(start=False, redis=url, postgres=None, connect_timeout=CONNECT_TIMEOUT)
    loop = asyncio.get_running_loop()
    runs: dict[str, list[tuple[float, str]]] = {"leader": [], "any": [], "broadcast": []}

    # One job per path a fire takes: run by the leader, handed to a node through the
    # dispatch stream (XREADGROUP BLOCK), handed to every member (XREAD BLOCK).
    @dist.every(seconds=0.5)
    async def on_leader(ctx: JobContext) -> None:
        runs["leader"].append((loop.time(), ctx.fire_id))

    @dist.every(seconds=0.5, run_on="any")
    async def anywhere(ctx: JobContext) -> None:
        runs["any"].append((loop.time(), ctx.fire_id))

    @dist.every(seconds=0.5, broadcast=True)
    async def everywhere(ctx: JobContext) -> None:
        runs["broadcast"].append((loop.time(), ctx.fire_id))

    async def all_ran_since(moment: float, within: float) -> list[str]:
        """The paths without a run after ``moment``, ``within`` seconds from now."""
        deadline = loop.time() + within
        while True:
            idle = [path for path, seen in runs.items() if not any(t > moment for t, _ in seen)]
            if not idle or loop.time() > deadline:
                return idle
            await asyncio.sleep(0.05)

    await dist.start()
    assert await all_ran_since(0.0, 20) == [], "the jobs never ran"

    # Every connection to Redis open now (store calls, blocking reads, the pool's idle
    # ones) and every new one goes silent, for longer than the read timeout.
    proxy.black_hole()
    await asyncio.sleep(BOUND + 2.0)
    proxy.heal()
    healed = loop.time()
    # Well within a minute: each loop notices within BOUND, the leader's term is won
    # again, and the next fires run.
    idle = await all_ran_since(healed, 30)
    counts = {path: len(seen) for path, seen in runs.items()}
    assert idle == [], f"no run after Redis answered again, in {idle} (runs: {counts})"
    fired = Counter(fire_id for _, fire_id in runs["any"])
    assert [f for f, n in fired.items() if n > 1] == [], "a run_on='any' fire ran twice"
