"""Semaphores and read/write locks: invariants under 8 processes, writer preference, expiry."""

from __future__ import annotations

import asyncio

import pytest

from asgi_dist import ConfigError, Dist, LockTimeout
from asgi_dist.backends.redis import create_redis_client
from tests.helpers.processes import ProcessGroup

SHARED = """
import asyncio, os, sys
from asgi_dist import Dist
from asgi_dist.backends.redis import create_redis_client

INDEX = int(sys.argv[1])

async def main():
    ns = os.environ["NS"]
    log = create_redis_client(os.environ["REDIS"])
    k = lambda s: "{%s}:%s" % (ns, s)
    async with Dist(redis=os.environ["REDIS"], postgres=os.environ["PG"] or None,
                    namespace=ns, sessions=False) as dist:
        if os.environ["MODE"] == "semaphore":
            sem = dist.semaphore("pool", 3, ttl=10, backend=os.environ["BACKEND"])
            for _ in range(15):
                async with sem:
                    await log.rpush(k("inside"), await log.incr(k("count")))
                    await asyncio.sleep(0.005)
                    await log.decr(k("count"))
        else:
            rw = dist.rwlock("doc", ttl=10)
            writer = INDEX < 2
            for _ in range(15):
                if writer:
                    async with rw.write():
                        w = await log.incr(k("writers"))
                        r = int(await log.get(k("readers")) or 0)
                        if w != 1 or r != 0:
                            await log.rpush(k("violations"), "writer saw w=%d r=%d" % (w, r))
                        await asyncio.sleep(0.005)
                        await log.decr(k("writers"))
                else:
                    async with rw.read():
                        r = await log.incr(k("readers"))
                        await log.rpush(k("inside"), r)
                        w = int(await log.get(k("writers")) or 0)
                        if w != 0:
                            await log.rpush(k("violations"), "reader saw a writer")
                        await asyncio.sleep(0.005)
                        await log.decr(k("readers"))
    await log.aclose()

asyncio.run(main())
"""


async def _run(
    processes: ProcessGroup,
    redis_url: str,
    ns: str,
    mode: str,
    pg: str = "",
    backend: str = "redis",
    n: int = 8,
) -> tuple[list[int], list[bytes]]:
    env = {"NS": ns, "REDIS": redis_url, "MODE": mode, "PG": pg, "BACKEND": backend}
    workers = processes.python(SHARED, n=n, env=env)
    codes = await asyncio.to_thread(processes.wait_all, 90)
    assert codes == [0] * n, "\n".join(w.output() for w in workers)
    log = create_redis_client(redis_url)
    try:
        inside = [int(x) for x in await log.lrange(f"{{{ns}}}:inside", 0, -1)]
        violations = await log.lrange(f"{{{ns}}}:violations", 0, -1)
    finally:
        await log.aclose()
    return inside, violations


@pytest.mark.parametrize(("backend", "n"), [("redis", 8), ("postgres", 5)])
async def test_semaphore_admits_at_most_limit_holders_across_processes(
    processes: ProcessGroup, redis_url: str, postgres_dsn: str, namespace: str, backend: str, n: int
) -> None:
    inside, _ = await _run(processes, redis_url, namespace, "semaphore", postgres_dsn, backend, n)
    assert len(inside) == n * 15
    assert max(inside) <= 3, "more holders than permits"
    assert max(inside) >= 2, "permits were never shared"


async def test_rwlock_excludes_writers_and_shares_readers_across_8_processes(
    processes: ProcessGroup, redis_url: str, namespace: str
) -> None:
    inside, violations = await _run(processes, redis_url, namespace, "rwlock")
    assert violations == []
    assert len(inside) == 6 * 15
    assert max(inside) >= 2, "readers never overlapped"


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_semaphore_permits_and_fences(make_dist, backend: str) -> None:
    dist: Dist = await make_dist(sessions=False)
    sem = dist.semaphore("pool", 2, ttl=10, backend=backend)  # type: ignore[arg-type]
    a = await sem.acquire()
    b = await sem.acquire()
    assert b.fence > a.fence
    with pytest.raises(LockTimeout):
        await sem.acquire(timeout=0)
    waiter = asyncio.create_task(sem.acquire(timeout=20))
    await asyncio.sleep(0.1)
    await a.release()
    c = await asyncio.wait_for(waiter, 20)  # woken by the release, not by the 10 s expiry
    assert c.fence > b.fence
    await b.release()
    await c.release()


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_a_waiting_writer_blocks_new_readers(make_dist, backend: str) -> None:
    dist: Dist = await make_dist(sessions=False)
    rw = dist.rwlock("doc", ttl=10, backend=backend)  # type: ignore[arg-type]
    r1 = await rw.read().acquire()
    r2 = await rw.read().acquire(timeout=0)  # readers share
    writer = asyncio.create_task(rw.write().acquire(timeout=20))
    await asyncio.sleep(0.2)
    assert not writer.done()
    with pytest.raises(LockTimeout):
        await rw.read().acquire(timeout=0)  # writer-preferring
    await r1.release()
    await r2.release()
    w = await asyncio.wait_for(writer, 20)
    assert w.fence > r2.fence
    with pytest.raises(LockTimeout):
        await rw.read().acquire(timeout=0)
    await w.release()
    r3 = await rw.read().acquire(timeout=0)
    assert r3.fence > w.fence
    await r3.release()


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_a_writer_that_gives_up_unblocks_readers(make_dist, backend: str) -> None:
    dist: Dist = await make_dist(sessions=False)
    rw = dist.rwlock("doc", ttl=10, backend=backend)  # type: ignore[arg-type]
    r1 = await rw.read().acquire()
    with pytest.raises(LockTimeout):
        await rw.write().acquire(timeout=0.2)
    r2 = await rw.read().acquire(timeout=0)  # the intent left with the writer
    await r1.release()
    await r2.release()


async def test_semaphore_permit_of_a_killed_process_expires(
    processes: ProcessGroup, make_dist, redis_url: str, namespace: str
) -> None:
    code = (
        "import asyncio, os\n"
        "from asgi_dist import Dist\n"
        "async def main():\n"
        "    async with Dist(redis=os.environ['REDIS'], namespace=os.environ['NS'],"
        " sessions=False) as d:\n"
        "        await d.semaphore('pool', 1, ttl=1.0).acquire()\n"
        "        print('held', flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    (worker,) = processes.python(code, env={"REDIS": redis_url, "NS": namespace})
    dist: Dist = await make_dist(sessions=False)
    sem = dist.semaphore("pool", 1, ttl=5)
    for _ in range(600):  # bounded: 30 s for the worker to start on a loaded machine
        if "held" in worker.output():
            break
        await asyncio.sleep(0.05)
    assert "held" in worker.output(), worker.output()
    with pytest.raises(LockTimeout):
        await sem.acquire(timeout=0)
    worker.kill()
    permit = await sem.acquire(timeout=10)  # after the dead holder's 1 s permit expired
    await permit.release()


def test_shared_lock_options_are_validated() -> None:
    dist = Dist(sessions=False)
    with pytest.raises(ConfigError, match="limit"):
        dist.semaphore("s", 0)
    with pytest.raises(ConfigError, match="backend"):
        dist.semaphore("s", 2, backend="zookeeper")


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_a_semaphore_asked_for_with_another_limit_than_its_permits_is_refused(
    make_dist, backend: str
) -> None:
    # Two limits for one name would let both count against their own: five
    # holders of a semaphore meant for one.
    dist: Dist = await make_dist(sessions=False)
    one = dist.semaphore("pool", 1, ttl=10, backend=backend)  # type: ignore[arg-type]
    five = dist.semaphore("pool", 5, ttl=10, backend=backend)  # type: ignore[arg-type]
    held = await one.acquire(timeout=0)
    with pytest.raises(
        ConfigError, match="granted under limit=1, but this process asks for limit=5"
    ):
        await five.acquire(timeout=0)
    await held.release()
    # No permit left: the new limit takes effect.
    permits = [await five.acquire(timeout=0) for _ in range(5)]
    with pytest.raises(ConfigError, match="granted under limit=5"):
        await one.acquire(timeout=0)
    for permit in permits:
        await permit.release()


OTHER_LIMIT = """
import asyncio, os
from asgi_dist import ConfigError, Dist
from asgi_dist.scheduling import SchedulerConfig

async def main():
    async with Dist(redis=os.environ["REDIS"], postgres=os.environ["PG"], sessions=False,
                    namespace=os.environ["NS"], scheduler=SchedulerConfig(enabled=False)) as d:
        sem = d.semaphore("pool", 3, ttl=10, backend=os.environ["BACKEND"])
        try:
            permit = await sem.acquire(timeout=0)
        except ConfigError as exc:
            print("refused:", exc)
            return
        print("admitted with fence", permit.fence)
        await permit.release()

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_a_permit_renewed_past_its_ttl_still_refuses_another_limit(
    make_dist,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    namespace: str,
    backend: str,
) -> None:
    # The limit a permit was granted under must live as long as the permit: a
    # process asking for limit=3 would otherwise join a semaphore meant for one.
    dist: Dist = await make_dist(sessions=False)
    async with dist.semaphore("pool", 1, ttl=1.0, backend=backend) as permit:  # type: ignore[arg-type]
        await asyncio.sleep(2.5)  # renewed twice or more: past its first ttl
        env = {"REDIS": redis_url, "PG": postgres_dsn, "NS": namespace, "BACKEND": backend}
        [other] = processes.python(OTHER_LIMIT, env=env)
        assert await asyncio.to_thread(other.wait, 60) == 0, other.output()
        assert not permit.lost.is_set()
    assert "refused: semaphore 'pool' has permits granted under limit=1" in other.output(), (
        other.output()
    )


WAITING_WRITER = """
import asyncio, os
from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig

async def main():
    async with Dist(redis=os.environ["REDIS"], postgres=os.environ["PG"], sessions=False,
                    namespace=os.environ["NS"], scheduler=SchedulerConfig(enabled=False)) as d:
        rw = d.rwlock("doc", ttl=30, backend=os.environ["BACKEND"])
        print("asking", flush=True)
        async with rw.write() as held:
            print("wrote", held.fence, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_writer_waiting_longer_than_its_intent_liveness_still_holds_readers_back(
    make_dist,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    namespace: str,
    backend: str,
) -> None:
    """A writer's intent lives 10 s unless refreshed; a writer waiting behind a reader
    that keeps renewing must refresh it, or new readers come in and starve it."""
    dist: Dist = await make_dist(sessions=False)
    rw = dist.rwlock("doc", ttl=30, backend=backend)  # type: ignore[arg-type]
    reader = await rw.read().acquire()
    env = {"REDIS": redis_url, "PG": postgres_dsn, "NS": namespace, "BACKEND": backend}
    [writer] = processes.python(WAITING_WRITER, env=env)
    for _ in range(600):  # bounded: the writer's process starting on a loaded machine
        try:
            late = await rw.read().acquire(timeout=0)
        except LockTimeout:
            break  # the writer's intent is there
        await late.release()
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the writer never queued:\n{writer.output()}")
    await asyncio.sleep(11.0)  # past the first intent's liveness
    with pytest.raises(LockTimeout):
        await rw.read().acquire(timeout=0)
    await reader.release()
    assert await asyncio.to_thread(writer.wait, 30) == 0, writer.output()
    assert "wrote" in writer.output()


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_a_local_waiter_that_won_a_shared_lease_holds_back_no_other_local_acquirer(
    make_dist, backend: str
) -> None:
    """Tasks of one process take turns for a lease (one competes at a time); a turn
    won on a semaphore or a read must not make the next task sleep until that
    permit's release, while other permits are free or reads are shared."""
    dist: Dist = await make_dist(sessions=False)
    loop = asyncio.get_running_loop()
    sem = dist.semaphore("pool", 3, ttl=30, backend=backend)  # type: ignore[arg-type]
    permits = [await sem.acquire(timeout=0) for _ in range(3)]
    waiter = asyncio.create_task(sem.acquire(timeout=10))
    await asyncio.sleep(0.2)
    await permits[0].release()
    won = await waiter  # through the turnstile
    await permits[1].release()  # a permit is free now
    started = loop.time()
    free = await sem.acquire(timeout=5)
    assert loop.time() - started < 1.0
    for permit in (free, won, permits[2]):
        await permit.release()

    rw = dist.rwlock("doc", ttl=30, backend=backend)  # type: ignore[arg-type]
    writer = await rw.write().acquire(timeout=0)
    reader = asyncio.create_task(rw.read().acquire(timeout=10))
    await asyncio.sleep(0.2)
    await writer.release()
    first = await reader  # through the turnstile
    started = loop.time()
    second = await rw.read().acquire(timeout=5)  # readers share
    assert loop.time() - started < 1.0
    await second.release()
    await first.release()

    # Permits freed together go to the local waiters together, not one per release.
    inside = peak = 0

    async def user() -> None:
        nonlocal inside, peak
        async with sem:
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.6)
            inside -= 1

    started = loop.time()
    await asyncio.gather(*(user() for _ in range(6)))
    assert peak == 3
    assert loop.time() - started < 1.8  # two rounds of 0.6 s, not four
