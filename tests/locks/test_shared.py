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
