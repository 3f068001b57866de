"""PostgreSQL leases: another process's release wakes waiters through LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio

from asgi_dist import Dist
from asgi_dist.locks.backend import Attempt


async def test_a_release_elsewhere_wakes_the_waiter_through_notify_without_polling(
    make_dist,
) -> None:
    holder: Dist = await make_dist(redis=None, sessions=False)
    waiter: Dist = await make_dist(redis=None, sessions=False)
    held = await holder.lock("k", ttl=60, backend="postgres").acquire()
    backend = waiter.locks.backend("postgres")
    attempts = 0
    original = backend.acquire

    async def counted(kind: str, name: str, token: str, ttl: float) -> Attempt:
        nonlocal attempts
        attempts += 1
        return await original(kind, name, token, ttl)

    backend.acquire = counted  # type: ignore[method-assign]
    waiting = asyncio.create_task(waiter.lock("k", backend="postgres").acquire(timeout=20))
    await asyncio.sleep(1.0)
    assert not waiting.done()
    assert backend.poll_interval is None, "the waiter's Dist is not listening"
    # The first attempt and the one after registering; polling at 0.25 s would add ~4.
    assert attempts <= 2
    await held.release()
    # 59 s of lease left: only the notification can let it in within the bound.
    second = await asyncio.wait_for(waiting, 10)
    assert second.fence == held.fence + 1
    await second.release()
