"""A short Redis outage does not end the scheduler leader's term: its lease outlives
the outage (Redis keeps its data), so stepping down would leave a lease nobody can
take until its ttl runs out, and the jobs would stop for that long."""

from __future__ import annotations

import asyncio
from typing import Any

from asgi_dist.scheduling import JobContext
from tests.transactions.proxy import TcpProxy


async def test_the_leader_keeps_its_term_through_a_short_outage_and_fires_right_after(
    redis_proxy: tuple[TcpProxy, str], sched_dist: Any
) -> None:
    proxy, url = redis_proxy
    # The default 15 s lease: renewals may fail for renew_deadline (10 s) before the
    # term is lost, far longer than the outage below.
    dist = await sched_dist(start=False, redis=url, postgres=None, leader_ttl=15.0)
    loop = asyncio.get_running_loop()
    runs: list[float] = []

    @dist.every(seconds=0.5)
    async def tick(ctx: JobContext) -> None:
        runs.append(loop.time())

    await dist.start()
    for _ in range(200):
        if runs:
            break
        await asyncio.sleep(0.05)
    assert runs, "the job never ran"
    scheduler = dist.scheduler
    terms, fence = scheduler.terms, scheduler.fence

    # Redis looks down for 2 s (every connection dropped, new ones refused), then is
    # back with its data: every pooled connection the Dist had is now dead.
    await proxy.cut()
    await asyncio.sleep(2.0)
    await proxy.restore()
    back = loop.time()
    for _ in range(100):
        if any(t > back for t in runs):
            break
        await asyncio.sleep(0.05)
    after = [t for t in runs if t > back]
    assert after, "no fire within 5 s of Redis answering again"
    assert after[0] - back < 5.0
    # The same term all along: no step-down on the outage's errors, nor on the dead
    # pooled connections met afterwards.
    await asyncio.sleep(2.0)
    assert (scheduler.terms, scheduler.fence) == (terms, fence)
    assert scheduler.leading
