"""Mutual exclusion proven with real OS processes on real servers."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.backends.redis import create_redis_client
from tests.helpers.processes import ProcessGroup
from tests.helpers.servers import RedisServer

# Each process increments a Redis counter N times under the lock with a
# read-modify-write that loses updates if two processes overlap, and records
# the fence it held in the critical section.
COUNTER = """
import asyncio, os, sys
from asgi_dist import Dist
from asgi_dist.backends.redis import create_redis_client

async def main():
    ns, backend = os.environ["NS"], os.environ["BACKEND"]
    log = create_redis_client(os.environ["LOG_REDIS"])
    async with Dist(redis=os.environ["REDIS"] or None, postgres=os.environ["PG"] or None,
                    namespace=ns, sessions=False) as dist:
        lock = dist.lock("counter", ttl=10, backend=backend)
        for _ in range(int(os.environ["N"])):
            async with lock as held:
                value = int(await log.get("{%s}:value" % ns) or 0)
                await asyncio.sleep(0)
                await log.set("{%s}:value" % ns, value + 1)
                await log.rpush("{%s}:fences" % ns, held.fence)
    await log.aclose()

asyncio.run(main())
"""


async def _run_counter(
    processes: ProcessGroup, *, ns: str, redis: str, pg: str, backend: str, log_redis: str, n: int
) -> None:
    env = {"NS": ns, "REDIS": redis, "PG": pg, "BACKEND": backend, "LOG_REDIS": log_redis}
    env["N"] = str(n)
    workers = processes.python(COUNTER, n=4, env=env)
    codes = await asyncio.to_thread(processes.wait_all, 90)
    assert codes == [0] * 4, "\n".join(w.output() for w in workers)
    log = create_redis_client(log_redis)
    try:
        value = int(await log.get(f"{{{ns}}}:value"))
        fences = [int(x) for x in await log.lrange(f"{{{ns}}}:fences", 0, -1)]
    finally:
        await log.aclose()
    assert value == 4 * n, "increments were lost: two processes held the lock together"
    assert fences == sorted(fences) and len(set(fences)) == len(fences) == 4 * n


async def test_four_processes_never_hold_the_redis_lock_together(
    processes: ProcessGroup, redis_url: str, namespace: str
) -> None:
    await _run_counter(
        processes, ns=namespace, redis=redis_url, pg="", backend="redis", log_redis=redis_url, n=100
    )


async def test_four_processes_never_hold_the_postgres_lock_together(
    processes: ProcessGroup, redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    await _run_counter(
        processes,
        ns=namespace,
        redis="",
        pg=postgres_dsn,
        backend="postgres",
        log_redis=redis_url,
        n=50,
    )


async def test_four_processes_never_hold_the_lock_together_on_a_cluster(
    processes: ProcessGroup, cluster_url: str, namespace: str
) -> None:
    await _run_counter(
        processes,
        ns=namespace,
        redis=cluster_url,
        pg="",
        backend="redis",
        log_redis=cluster_url,
        n=30,
    )


HOLDER = """
import asyncio, os, sys
from asgi_dist import Dist, LockLost
from asgi_dist.backends.redis import create_redis_client

async def main():
    ns = os.environ["NS"]
    log = create_redis_client(os.environ["REDIS"])
    async with Dist(redis=os.environ["REDIS"], namespace=ns, sessions=False) as dist:
        try:
            async with dist.lock("job", ttl=1.0) as held:
                await log.rpush(ns + ":events", "acquired:%d" % held.fence)
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    await log.rpush(ns + ":events", "cancelled")
                    raise
        except LockLost:
            await log.rpush(ns + ":events", "lost:%d" % held.lost.is_set())
    await log.aclose()

asyncio.run(main())
"""


async def test_a_stopped_holder_loses_the_lock_and_its_body_is_cancelled_on_resume(
    processes: ProcessGroup, make_dist, redis_url: str, redis_client: aioredis.Redis, namespace: str
) -> None:
    (worker,) = processes.python(HOLDER, env={"NS": namespace, "REDIS": redis_url})
    events = f"{namespace}:events"
    deadline = time.monotonic() + 30
    while not await redis_client.llen(events):
        assert time.monotonic() < deadline, worker.output()
        await asyncio.sleep(0.05)
    first_fence = int((await redis_client.lindex(events, 0)).split(b":")[1])
    worker.stop()  # SIGSTOP: no renewals any more
    dist: Dist = await make_dist(sessions=False)
    held = await dist.lock("job").acquire(timeout=10)  # granted once its 1 s lease expired
    assert held.fence > first_fence
    worker.cont()
    assert await asyncio.to_thread(worker.wait, 30) == 0, worker.output()
    assert [e.decode() for e in await redis_client.lrange(events, 1, -1)] == ["cancelled", "lost:1"]
    # The resumed process did not disturb the new holder.
    assert await dist.lock("job").locked()
    await held.release()


@pytest.fixture
def debug_redis() -> Iterator[RedisServer]:
    """A private server that allows DEBUG SLEEP (to slow scripts down on purpose)."""
    server = RedisServer("--enable-debug-command", "yes").start()
    yield server
    server.close()


async def test_cancelled_acquires_leave_no_key_queue_entry_or_subscription(
    make_dist, debug_redis: RedisServer
) -> None:
    """1,000 acquires cancelled at random moments, part of them while Redis sleeps."""
    dist: Dist = await make_dist(redis=debug_redis.url, postgres=None, sessions=False)
    other: Dist = await make_dist(redis=debug_redis.url, postgres=None, sessions=False)
    admin = aioredis.Redis.from_url(debug_redis.url)
    rng = random.Random(7)

    async def contender(i: int) -> None:
        async with dist.lock("hot", ttl=5, fair=i % 2 == 0, timeout=None):
            await asyncio.sleep(rng.random() * 0.002)

    try:
        for round_ in range(10):
            holder = await other.lock("hot", ttl=5).acquire(timeout=10)
            tasks = [asyncio.create_task(contender(i)) for i in range(100)]
            if round_ % 3 == 0:
                # Slow Redis down so that cancellations land while scripts are in flight.
                sleeper = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", "0.05"))
            await asyncio.sleep(rng.random() * 0.01)
            await holder.release()
            for task in tasks:
                await asyncio.sleep(rng.random() * 0.0005)
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if round_ % 3 == 0:
                await sleeper
        await asyncio.sleep(0.2)  # shielded cleanups finish in the background
        keys = [k.decode() for k in await admin.keys(f"{{{dist.namespace}:lock:hot}}*")]
        assert keys == [f"{{{dist.namespace}:lock:hot}}:fence"], keys
        assert dist.runtime.pubsub.channels == frozenset()
        channel = f"{{{dist.namespace}:lock:hot}}:wake"

        async def unsubscribed() -> bool:
            return (await admin.pubsub_numsub(channel))[0][1] == 0

        deadline = time.monotonic() + 5
        while not await unsubscribed():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        fresh = await other.lock("hot").acquire(timeout=0)
        await fresh.release()
    finally:
        await admin.aclose()


async def test_waiters_send_no_commands_while_waiting(make_dist, redis_server) -> None:
    dist: Dist = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        held = await dist.lock("k", ttl=30).acquire()
        waiters = [asyncio.create_task(dist.lock("k").acquire(timeout=20)) for _ in range(10)]
        await asyncio.sleep(0.3)
        before = (await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
        await asyncio.sleep(1.0)
        after = (await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
        assert after == before, "waiters polled Redis while the lock was held"
        await held.release()
        # Each waiter is woken by the release (the lease had 29 s left).
        for _ in range(10):
            done, _pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                waiters.remove(task)
                await task.result().release()
    finally:
        await admin.aclose()


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_fair_lock_serves_waiters_in_arrival_order(make_dist, backend: str) -> None:
    dist: Dist = await make_dist(sessions=False)
    others = [await make_dist(sessions=False) for _ in range(3)]
    order: list[int] = []
    held = await dist.lock("q", fair=True, backend=backend).acquire()  # type: ignore[arg-type]

    async def waiter(i: int, d: Dist) -> None:
        async with d.lock("q", fair=True, backend=backend):  # type: ignore[arg-type]
            order.append(i)
            await asyncio.sleep(0.01)

    tasks = []
    for i in range(9):
        tasks.append(asyncio.create_task(waiter(i, others[i % 3])))
        await asyncio.sleep(0.05)  # a definite arrival order
    # A newcomer arriving after the queue formed must not barge in.
    late = asyncio.create_task(waiter(99, dist))
    await asyncio.sleep(0.05)
    await held.release()
    await asyncio.wait_for(asyncio.gather(*tasks, late), 20)
    assert order == [*range(9), 99]


@pytest.mark.parametrize("n", [1])
async def test_fair_queue_skips_a_dead_waiter(make_dist, redis_client, n: int) -> None:
    dist: Dist = await make_dist(sessions=False)
    held = await dist.lock("q", fair=True).acquire()
    tag = f"{{{dist.namespace}:lock:q}}"
    # A waiter of a crashed process: queued, never refreshed.
    now = await redis_client.time()
    ms = now[0] * 1000 + now[1] // 1000
    await redis_client.zadd(f"{tag}:queue", {"ghost@dead": 1})
    await redis_client.zadd(f"{tag}:alive", {"ghost@dead": ms + 300})
    await redis_client.hset(f"{tag}:ttls", "ghost@dead", 30000)
    waiter = asyncio.create_task(dist.lock("q", fair=True).acquire(timeout=20))
    await asyncio.sleep(0.6)  # the ghost's liveness expired
    await held.release()
    second = await asyncio.wait_for(waiter, 20)
    await second.release()
    assert json.dumps(await redis_client.zrange(f"{tag}:queue", 0, -1)) == "[]"


# A process whose fair waiter queues (and, with HOLD, which holds the lock with a
# short ttl first); it is SIGKILLed while its waiter is at the head of the queue.
FAIR_VICTIM = """
import asyncio, os
from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig

async def main():
    async with Dist(redis=os.environ["REDIS"], namespace=os.environ["NS"], sessions=False,
                    scheduler=SchedulerConfig(enabled=False)) as dist:
        lock = dist.lock("q", fair=True, ttl=30)
        if os.environ["HOLD"]:
            await dist.lock("q", fair=True, ttl=2).acquire(timeout=0)
        waiter = asyncio.create_task(lock.acquire(timeout=120))
        await asyncio.sleep(1.5)  # queued and subscribed for a while
        print("queued", flush=True)
        await waiter

asyncio.run(main())
"""


@pytest.mark.parametrize("holder", ["released", "killed"])
async def test_a_fair_waiter_killed_at_the_head_of_the_queue_is_skipped(
    make_dist, processes: ProcessGroup, redis_url: str, namespace: str, holder: str
) -> None:
    """Its liveness has not run out yet, but nobody listens for it any more: the
    lease goes to the next live waiter, not to the dead one for its 30 s ttl."""
    dist: Dist = await make_dist(postgres=None, sessions=False)
    held = await dist.lock("q", fair=True, ttl=30).acquire() if holder == "released" else None
    env = {"REDIS": redis_url, "NS": namespace, "HOLD": "" if held is not None else "1"}
    [victim] = processes.python(FAIR_VICTIM, env=env)
    for _ in range(600):  # bounded: 30 s for the process to start on a loaded machine
        if "queued" in victim.output():
            break
        await asyncio.sleep(0.05)
    assert "queued" in victim.output(), victim.output()
    waiting = asyncio.create_task(dist.lock("q", fair=True, ttl=30).acquire(timeout=15))
    await asyncio.sleep(0.3)
    victim.kill()
    loop = asyncio.get_running_loop()
    started = loop.time()
    if held is not None:
        await held.release()
    second = await waiting  # LockTimeout after 15 s if the dead waiter got it
    # Released: at once.  Killed holder: its 2 s lease ran out, and the live
    # waiter's next liveness attempt (every 10/3 s) found the queue's dead head.
    assert loop.time() - started < (1.0 if held is not None else 7.0)
    await second.release()
