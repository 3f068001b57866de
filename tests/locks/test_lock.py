"""The lock handle on every backend: fences, timeouts, release, extend, loss, reentrancy."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from asgi_dist import ConfigError, Dist, LockLost, LockNotOwned, LockTimeout

BACKENDS = ["redis", "postgres", "memory"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_fences_increase_and_release_frees_the_lock(make_dist, backend: str) -> None:
    dist: Dist = await make_dist(sessions=False)
    lock = dist.lock("sku:1", ttl=5, backend=backend)  # type: ignore[arg-type]
    fences = []
    for _ in range(3):
        async with lock as held:
            assert await lock.locked()
            fences.append(held.fence)
        assert not await lock.locked()
    assert fences == sorted(set(fences)) and len(fences) == 3


@pytest.mark.parametrize("backend", BACKENDS)
async def test_busy_lock_times_out_with_a_retry_hint(make_dist, backend: str) -> None:
    dist: Dist = await make_dist(sessions=False)
    other: Dist = await make_dist(sessions=False)
    held = await dist.lock("sku:1", ttl=20, backend=backend).acquire()  # type: ignore[arg-type]
    with pytest.raises(LockTimeout) as info:
        await other.lock("sku:1", backend=backend).acquire(timeout=0)  # type: ignore[arg-type]
    assert 0 < info.value.retry_after <= 20
    assert info.value.name == "sku:1"
    with pytest.raises(LockTimeout):
        await other.lock("sku:1", backend=backend).acquire(timeout=0.3)  # type: ignore[arg-type]
    await held.release()
    again = await other.lock("sku:1", backend=backend).acquire(timeout=0)  # type: ignore[arg-type]
    assert again.fence > held.fence
    await again.release()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_waiter_gets_the_lock_when_the_holder_releases(make_dist, backend: str) -> None:
    dist: Dist = await make_dist(sessions=False)
    other: Dist = await make_dist(sessions=False)
    held = await dist.lock("k", ttl=60, backend=backend).acquire()  # type: ignore[arg-type]
    waiter = asyncio.create_task(other.lock("k", backend=backend).acquire(timeout=20))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await held.release()
    # ttl 60 s: only the release can have let it in within the 20 s bound.
    second = await asyncio.wait_for(waiter, 20)
    assert second.fence == held.fence + 1
    await second.release()


async def test_watchdog_keeps_a_lock_past_its_ttl_on_every_backend(make_dist) -> None:
    dist: Dist = await make_dist(sessions=False)
    other: Dist = await make_dist(sessions=False)

    async def hold(backend: str) -> None:
        async with dist.lock("k", ttl=1.2, backend=backend) as held:  # type: ignore[arg-type]
            await asyncio.sleep(2.0)
            assert not held.lost.is_set()
            with pytest.raises(LockTimeout):
                await other.lock("k", backend=backend).acquire(timeout=0)  # type: ignore[arg-type]

    # The backends side by side: one watchdog renews them all.
    await asyncio.gather(*(hold(b) for b in BACKENDS))


async def test_lost_lock_cancels_the_body_and_raises_lock_lost(
    make_dist, redis_client: aioredis.Redis
) -> None:
    dist: Dist = await make_dist(sessions=False)
    cancelled = False
    with pytest.raises(LockLost, match="lost"):
        async with dist.lock("k", ttl=0.9) as held:
            await redis_client.hset(f"{{{dist.namespace}:lock:k}}:lease", "token", "thief@x")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled = True
                raise
    assert cancelled and held.lost.is_set()
    with pytest.raises(LockNotOwned):
        await held.extend()


async def test_outer_cancellation_still_propagates_through_a_held_lock(make_dist) -> None:
    dist: Dist = await make_dist(sessions=False)

    async def body() -> None:
        async with dist.lock("k", ttl=5):
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Released on the way out although the task was being cancelled.
    assert not await dist.lock("k").locked()


async def test_extend_and_double_release(make_dist, redis_client: aioredis.Redis) -> None:
    dist: Dist = await make_dist(sessions=False)
    held = await dist.lock("k", ttl=2).acquire()
    await held.extend(30)
    pttl = await redis_client.pttl(f"{{{dist.namespace}:lock:k}}:lease")
    assert 20_000 < pttl <= 30_000
    await held.release()
    await held.release()  # a no-op
    with pytest.raises(LockNotOwned):
        await held.extend()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_reentrant_lock_nests_in_one_task_but_excludes_others(
    make_dist, backend: str
) -> None:
    dist: Dist = await make_dist(sessions=False)
    lock = dist.lock("k", reentrant=True, backend=backend)  # type: ignore[arg-type]
    async with lock as outer:
        async with lock as inner:
            assert inner is outer
            other_task = asyncio.create_task(lock.acquire(timeout=0))
            with pytest.raises(LockTimeout):
                await other_task
        assert await lock.locked()
    assert not await lock.locked()


def test_options_are_validated() -> None:
    dist = Dist(sessions=False)
    with pytest.raises(ConfigError, match="ttl"):
        dist.lock("k", ttl=0)
    with pytest.raises(ConfigError, match="timeout"):
        dist.lock("k", timeout=-1)
    with pytest.raises(ConfigError, match="brace"):
        dist.lock("a{b}")
    with pytest.raises(ConfigError, match="fair=True needs the Redis, ZooKeeper or memory"):
        dist.lock("k", fair=True, backend="postgres")
    for bad in (float("nan"), float("inf"), True, "5"):
        with pytest.raises(ConfigError, match="timeout="):
            dist.lock("k", timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="ttl="):
            dist.lock("k", ttl=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="retry='x' is invalid"):
        dist.election("e", retry="x")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_extend_refuses_a_ttl_out_of_range_and_keeps_the_lease(
    make_dist, backend: str
) -> None:
    dist: Dist = await make_dist(sessions=False)
    held = await dist.lock("k", ttl=5, backend=backend).acquire()  # type: ignore[arg-type]
    for bad in (0, -1, float("nan"), float("inf"), 10**9, "5", True):
        with pytest.raises(ConfigError, match=r"extend\(ttl\)="):
            await held.extend(bad)  # type: ignore[arg-type]
    await held.extend(10)
    assert not held.lost.is_set()
    await held.release()


async def test_locks_refuse_to_be_taken_on_a_dist_that_is_not_running(make_dist) -> None:
    dist: Dist = await make_dist(sessions=False, start=False)
    lock, election = dist.lock("k"), dist.election("e")
    with pytest.raises(ConfigError, match="the Dist is not started"):
        await lock.acquire(timeout=0)
    async with dist:
        await (await lock.acquire(timeout=0)).release()
        term = await election.campaign(timeout=5)
        await term.release()
    # Stopped: nothing would renew a lease taken now, or give it back.
    with pytest.raises(ConfigError, match="the Dist is not started"):
        await lock.acquire(timeout=0)
    with pytest.raises(ConfigError, match="the Dist is not started"):
        await election.campaign(timeout=0)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_waiters_giving_up_together_get_lock_timeout_or_cancelled_error(
    make_dist, backend: str
) -> None:
    # Several tasks of one process queue for one lock; those that give up in the
    # same turn of the loop must each get their own error, nothing else.
    dist: Dist = await make_dist(sessions=False)
    lock = dist.lock("k", ttl=10, backend=backend)  # type: ignore[arg-type]
    held = await lock.acquire()
    for _ in range(5):
        timed = [asyncio.create_task(lock.acquire(timeout=0.2)) for _ in range(4)]
        outcomes = await asyncio.gather(*timed, return_exceptions=True)
        assert all(isinstance(o, LockTimeout) for o in outcomes), outcomes
    waiting = [asyncio.create_task(lock.acquire(timeout=10)) for _ in range(3)]
    await asyncio.sleep(0.1)
    waiting[0].cancel()
    waiting[1].cancel()
    outcomes = await asyncio.gather(*waiting[:2], return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
    await held.release()
    third = await asyncio.wait_for(waiting[2], 10)  # the one left is served
    assert third.fence > held.fence
    await third.release()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_per_name_bookkeeping_is_freed_after_busy_try_once_attempts(
    make_dist, backend: str
) -> None:
    """A 409 from @dist.locked is a try-once attempt on a lock this process holds:
    thousands of names must leave nothing behind in the process."""
    from asgi_dist.locks import lease

    dist: Dist = await make_dist(sessions=False)
    before = len(lease._gates)
    for i in range(50):
        lock = dist.lock(f"order:{i}", ttl=5, backend=backend)  # type: ignore[arg-type]
        async with lock:
            with pytest.raises(LockTimeout):
                await lock.acquire(timeout=0)
        # and a waiter that got it at once, after the holder left
        await (await lock.acquire(timeout=1)).release()
    assert len(lease._gates) == before
