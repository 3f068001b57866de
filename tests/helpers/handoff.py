"""A lock handed from one Dist to another through Redis: the check several
deployment tests (TLS, Sentinel, unix socket, ACL) make on their own server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from asgi_dist import Dist


async def assert_handed_over(holder: Dist, waiter: Dist, name: str = "handoff") -> None:
    """``waiter`` queues behind ``holder``'s lock, sleeps, and is handed the lease
    (woken through pub/sub) with a larger fence when ``holder`` releases it."""
    held = await holder.lock(name, ttl=5.0).acquire()
    waiting = asyncio.ensure_future(waiter.lock(name, ttl=5.0).acquire(timeout=10.0))
    await asyncio.sleep(0.1)  # the other Dist's waiter queues and sleeps
    assert not waiting.done()
    await held.release()
    handed = await asyncio.wait_for(waiting, 10)
    assert handed.fence > held.fence
    await handed.release()


@asynccontextmanager
async def two_dists(make_dist: Callable[..., Any], url: str) -> AsyncIterator[tuple[Dist, Dist]]:
    """Two started Dists on ``url`` (no PostgreSQL, no sessions), stopped on exit,
    before the caller's private server goes."""
    dists: list[Dist] = []
    try:
        for _ in range(2):
            dists.append(await make_dist(redis=url, postgres=None, sessions=False))
        yield dists[0], dists[1]
    finally:
        for dist in dists:
            await dist.stop()
