"""Lock cohorting: a release hands the lock to the next waiter of its own process
in the release's round trip; after a few in a row it yields to other processes
when one of them is listening."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.backends.redis import Script


async def _calls(admin: aioredis.Redis, command: str) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_local_waiters_get_the_lock_in_the_releases_round_trip(
    make_dist, redis_server
) -> None:
    dist: Dist = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    admin = aioredis.Redis.from_url(redis_server.url)
    counter = {"value": 0, "inside": 0}
    fences: list[int] = []

    async def contender() -> None:
        for _ in range(25):
            async with dist.lock("hot", ttl=10) as held:
                counter["inside"] += 1
                assert counter["inside"] == 1
                fences.append(held.fence)
                await asyncio.sleep(0)
                counter["value"] += 1
                counter["inside"] -= 1

    try:
        scripts, publishes = await _calls(admin, "evalsha"), await _calls(admin, "publish")
        await asyncio.wait_for(asyncio.gather(*(contender() for _ in range(4))), 60)
        scripts = await _calls(admin, "evalsha") - scripts
        publishes = await _calls(admin, "publish") - publishes
    finally:
        await admin.aclose()
    assert counter["value"] == 100
    assert fences == sorted(fences) and len(set(fences)) == 100
    # Attempt + release per acquisition would be 200 scripts.  A hand-off through
    # Redis reserves fences, and the process hands the lease on among its own
    # waiters without a round trip until the cohort window (20 ms) ends.
    assert scripts < 30, scripts
    # Only releases to everyone publish, and with no other process listening
    # the cohort never has to yield (a few races with a late waiter remain).
    assert publishes < 25, publishes


async def test_a_waiter_served_within_its_process_leaves_the_queue_of_processes(
    make_dist, redis_server
) -> None:
    # A try-once holder bypasses the local turnstile, so the waiter queues its
    # process in Redis; served by that holder's release, in-process, it must not
    # stay named there, or a later release by another process would hand the
    # lease to a waiter that is gone (and the next one would wait out the ttl).
    here = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    there = await make_dist(
        redis=redis_server.url, postgres=None, sessions=False, namespace=here.namespace
    )
    admin = aioredis.Redis.from_url(redis_server.url)
    tag = f"{{{here.namespace}:lock:stale}}"
    try:
        first = await here.lock("stale", ttl=30).acquire(timeout=0)
        waiter = asyncio.create_task(here.lock("stale", ttl=30).acquire(timeout=10))
        await asyncio.sleep(0.2)
        assert await admin.hlen(f"{tag}:heads") == 1  # queued, named
        await first.release()
        served = await asyncio.wait_for(waiter, 5)
        assert await admin.hlen(f"{tag}:heads") == 0
        assert await admin.zcard(f"{tag}:waiters") == 0
        await served.release()
        # The other process's turn: its release must not go to the served waiter.
        holder = await there.lock("stale", ttl=30).acquire(timeout=1)
        late = asyncio.create_task(here.lock("stale", ttl=30).acquire(timeout=10))
        await asyncio.sleep(0.2)
        await holder.release()
        got = await asyncio.wait_for(late, 2)
        await got.release()
    finally:
        await admin.aclose()


async def test_a_lease_handed_on_within_the_process_is_renewed_and_stays_fenced(
    make_dist, redis_server
) -> None:
    # A short ttl and a run much longer than it: the lease passes from task to
    # task without Redis, under the token Redis knows, and the watchdog keeps
    # renewing it for whichever task holds it.
    dist: Dist = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    admin = aioredis.Redis.from_url(redis_server.url)
    fences: list[int] = []
    tokens: set[str] = set()
    stop_at = asyncio.get_running_loop().time() + 1.5

    async def contender() -> None:
        while asyncio.get_running_loop().time() < stop_at:
            async with dist.lock("relay", ttl=0.6) as held:
                fences.append(held.fence)
                tokens.add(held.token)
                stored = await admin.hget(f"{{{dist.namespace}:lock:relay}}:lease", "token")
                assert stored == held.token.encode()  # Redis knows who holds it
                await asyncio.sleep(0.002)

    try:
        await asyncio.wait_for(asyncio.gather(*(contender() for _ in range(3))), 30)
    finally:
        await admin.aclose()
    assert fences == sorted(fences) and len(set(fences)) == len(fences)
    assert len(fences) > len(tokens)  # some hand-offs kept the store's token
    fresh = await dist.lock("relay", ttl=5).acquire(timeout=1)
    assert fresh.fence > fences[-1]  # the fences reserved and unused are skipped
    await fresh.release()


async def test_a_waiter_of_another_process_is_not_starved_by_local_hand_offs(
    make_dist,
) -> None:
    busy: Dist = await make_dist(postgres=None, sessions=False)
    other: Dist = await make_dist(postgres=None, sessions=False)
    stop = asyncio.Event()
    rounds = 0

    async def contender() -> None:
        nonlocal rounds
        for _ in range(5000):
            if stop.is_set():
                return
            async with busy.lock("hot", ttl=10):
                rounds += 1
                await asyncio.sleep(0.001)

    tasks = [asyncio.create_task(contender()) for _ in range(3)]
    try:
        await asyncio.sleep(0.1)
        assert rounds > 0
        held = await other.lock("hot", ttl=10).acquire(timeout=10)
        # It got in while the cohort kept contending (not after it ran out).
        assert not any(t.done() for t in tasks)
        await held.release()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def test_a_release_hands_the_lock_to_one_waiting_process_in_its_round_trip(
    make_dist, redis_server
) -> None:
    # Four Dists stand for four processes: each has its own connections and its
    # own place in the lock's queue of waiting processes.
    holder = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    namespace = holder.namespace
    others = [
        await make_dist(redis=redis_server.url, postgres=None, sessions=False, namespace=namespace)
        for _ in range(3)
    ]
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        held = await holder.lock("hot", ttl=30).acquire()
        waiting = []
        for dist in others:  # one after the other: their queue order is known
            waiting.append(asyncio.create_task(dist.lock("hot", ttl=30).acquire(timeout=30)))
            await asyncio.sleep(0.2)
        order = []
        for _ in range(3):
            before = await _calls(admin, "evalsha")
            await held.release()
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.2)  # a second process woken would have attempted by now
            # Only the release: it handed the lease to the waiter of the longest
            # waiting process, which needed no attempt of its own; no herd.
            assert await _calls(admin, "evalsha") - before == 1
            assert len(done) == 1
            winner = done.pop()
            order.append(waiting.index(winner))
            waiting[waiting.index(winner)] = asyncio.create_task(asyncio.sleep(3600))
            held = winner.result()
        assert order == [0, 1, 2]  # the longest-waiting process is served first
        await held.release()
    finally:
        for task in waiting:
            task.cancel()
        await admin.aclose()


async def test_a_waiter_that_gives_up_leaves_the_queue_of_waiting_processes(
    make_dist, redis_server
) -> None:
    first = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    second = await make_dist(
        redis=redis_server.url, postgres=None, sessions=False, namespace=first.namespace
    )
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        held = await first.lock("busy", ttl=30).acquire()
        queue = f"{{{first.namespace}:lock:busy}}:waiters"
        waiter = asyncio.create_task(second.lock("busy", ttl=30).acquire(timeout=5))
        await asyncio.sleep(0.2)
        assert await admin.zcard(queue) == 1  # queued while it waits
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert await admin.exists(queue) == 0  # and gone once it gave up
        await held.release()
    finally:
        await admin.aclose()


async def test_a_lock_handed_to_a_process_whose_waiter_then_leaves_is_passed_on(
    make_dist, redis_server
) -> None:
    holder = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    waiter = await make_dist(
        redis=redis_server.url, postgres=None, sessions=False, namespace=holder.namespace
    )
    admin = aioredis.Redis.from_url(redis_server.url)
    tag = f"{{{holder.namespace}:lock:baton}}"
    keys = [f"{tag}:lease", f"{tag}:fence", f"{tag}:waiters", f"{tag}:heads"]
    # A process ahead in the queue that is still subscribed but whose waiter is
    # about to give up: the release hands the lease to that waiter.
    leaving = admin.pubsub()
    await leaving.subscribe(f"{tag}:wake:leaving")
    try:
        held = await holder.lock("baton", ttl=30).acquire()
        await admin.zadd(keys[2], {"leaving": 1})  # the longest waiting
        await admin.hset(keys[3], "leaving", "30000:gone@node")
        waiting = asyncio.create_task(waiter.lock("baton", ttl=30).acquire(timeout=20))
        await asyncio.sleep(0.2)
        await held.release()
        assert await admin.hget(keys[0], "token") == b"gone@node"
        await asyncio.sleep(0.3)
        assert not waiting.done()  # served: the leaving process, not this one
        # Its waiter leaves (leave.lua, run by a waiter that gives up): the lease
        # it was handed goes on to the next process in line, fence and all.
        leave = Script("asgi_dist.locks", "leave")
        assert await leave(admin, keys, ["leaving", f"{tag}:wake", "gone@node"]) == 2
        got = await asyncio.wait_for(waiting, 5)
        assert got.fence == held.fence + 2  # one more for the hand-off it never used
        assert await admin.zcard(keys[2]) == 0 and await admin.hlen(keys[3]) == 0
        await got.release()
    finally:
        await leaving.aclose()
        await admin.aclose()
