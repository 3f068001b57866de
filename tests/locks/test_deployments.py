"""The lock on other deployment shapes, and the watchdog's batching."""

from __future__ import annotations

import asyncio

import pytest

from asgi_dist import Dist, LockTimeout
from asgi_dist.locks.backend import Renewal
from asgi_dist.locks.redis import RedisLeases
from tests.helpers.servers import redis_sentinel


async def test_lock_and_election_work_behind_sentinel(make_dist) -> None:
    with redis_sentinel("locks") as (_primary, sentinel):
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/locks"
        dist: Dist = await make_dist(redis=url, postgres=None, sessions=False)
        other: Dist = await make_dist(redis=url, postgres=None, sessions=False)
        held = await dist.lock("k", ttl=5).acquire()
        waiter = asyncio.create_task(other.lock("k").acquire(timeout=10))
        await asyncio.sleep(0.1)
        await held.release()
        second = await asyncio.wait_for(waiter, 10)  # woken through pub/sub behind Sentinel
        assert second.fence > held.fence
        await second.release()
        async with dist.election("e", ttl=5, renew_deadline=3, retry=1).leadership() as term:
            assert term.fence >= 1
            assert await other.election("e", ttl=5, renew_deadline=3, retry=1).try_lead() is None


async def test_watchdog_renews_every_held_lock_in_one_round_trip_per_tick(make_dist) -> None:
    dist: Dist = await make_dist(postgres=None, sessions=False)
    backend = dist.locks.backend("redis")
    assert isinstance(backend, RedisLeases)
    batches: list[int] = []
    original = backend.renew_many

    async def counting(leases: list[Renewal]) -> list[bool | BaseException]:
        batches.append(len(leases))
        return await original(leases)

    backend.renew_many = counting  # type: ignore[method-assign,assignment]
    helds = [await dist.lock(f"k{i}", ttl=1.2).acquire() for i in range(20)]
    await asyncio.sleep(2.0)  # several renewal periods (ttl/3 = 0.4 s) past the ttl
    assert all(not h.lost.is_set() for h in helds)
    with pytest.raises(LockTimeout):
        await dist.lock("k7").acquire(timeout=0)
    assert len(batches) >= 3
    # Leases acquired together are renewed together: one pipeline per tick.
    assert max(batches) == 20
    assert sum(batches) / len(batches) > 10
    for h in helds:
        await h.release()
