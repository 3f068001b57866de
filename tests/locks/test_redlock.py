"""Redlock over three private Redis servers: majority grants, fences across majorities."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from asgi_dist import BackendUnavailable, ConfigError, Dist, LockTimeout
from tests.helpers.processes import ProcessGroup
from tests.helpers.servers import RedisServer


@pytest.fixture
def three_servers() -> Iterator[list[RedisServer]]:
    servers = [RedisServer().start() for _ in range(3)]
    yield servers
    for server in servers:
        server.close()


async def test_a_majority_grants_the_lock_and_fences_grow_across_majorities(
    make_dist, three_servers: list[RedisServer]
) -> None:
    dist: Dist = await make_dist(postgres=None, sessions=False)
    other: Dist = await make_dist(postgres=None, sessions=False)
    urls = [s.url for s in three_servers]
    ours, theirs = dist.locks.redlock(urls), other.locks.redlock(urls)
    first = await ours.lock("job", ttl=5).acquire()
    with pytest.raises(LockTimeout):
        await theirs.lock("job", ttl=5).acquire(timeout=0)
    await first.release()
    three_servers[0].kill()  # one of three down: a majority still answers
    second = await theirs.lock("job", ttl=5).acquire(timeout=2)
    assert second.fence > first.fence
    await second.release()
    three_servers[0].start()  # back, empty: its counter restarted at 0
    three_servers[1].kill()
    third = await ours.lock("job", ttl=5).acquire(timeout=2)
    # servers 0 and 2 granted; 2 carried the raised counter, so the order holds.
    assert third.fence > second.fence
    await third.release()


async def test_without_a_majority_nothing_is_held(
    make_dist, three_servers: list[RedisServer]
) -> None:
    dist: Dist = await make_dist(postgres=None, sessions=False)
    quorum = dist.locks.redlock([s.url for s in three_servers])
    three_servers[0].kill()
    three_servers[1].kill()
    with pytest.raises(Exception, match="majority"):
        await quorum.lock("job", ttl=5).acquire(timeout=0)
    # The one live server was undone: nobody holds a partial grant.
    assert three_servers[2].cli("keys", "*lease*") == ""


async def test_quorum_lock_is_renewed_past_its_ttl(make_dist, three_servers) -> None:  # type: ignore[no-untyped-def]
    dist: Dist = await make_dist(postgres=None, sessions=False)
    quorum = dist.locks.redlock([s.url for s in three_servers])
    async with quorum.lock("job", ttl=1.2) as held:
        await asyncio.sleep(2.0)
        assert not held.lost.is_set()
        with pytest.raises(LockTimeout):
            await quorum.lock("job").acquire(timeout=0)


async def test_a_slow_grant_counts_its_lease_from_the_start_of_the_attempt(
    make_dist, three_servers: list[RedisServer]
) -> None:
    """The servers' leases run from when they granted, early in a slow attempt: the
    holder must call its lease lost before they can expire, not a whole renew
    deadline after the attempt returned."""
    dist: Dist = await make_dist(postgres=None, sessions=False)
    quorum = dist.locks.redlock([s.url for s in three_servers], server_timeout=0.8)
    loop = asyncio.get_running_loop()
    three_servers[2].pause()  # the attempt waits out its server timeout
    try:
        started = loop.time()
        held = await quorum.lock("job", ttl=2.0).acquire(timeout=5)
        assert loop.time() - started >= 0.8
        for server in three_servers[:2]:
            server.pause()  # no renewal can succeed now
        try:
            await asyncio.wait_for(held.lost.wait(), 5)
            lost_after = loop.time() - started
        finally:
            for server in three_servers[:2]:
                server.resume()
    finally:
        three_servers[2].resume()
    # The servers granted within the first moments: their leases end about 2 s after
    # `started`; the holder knew before that.
    assert lost_after < 2.0


def test_redlock_needs_an_odd_number_of_servers() -> None:
    dist = Dist(sessions=False)
    with pytest.raises(ConfigError, match="odd"):
        dist.locks.redlock(["redis://a:1", "redis://b:2"])


CONTENDER = """
import asyncio, os, sys
from asgi_dist import Dist, LockTimeout
from asgi_dist.scheduling import SchedulerConfig

async def main():
    async with Dist(namespace=os.environ["NS"], sessions=False,
                    scheduler=SchedulerConfig(enabled=False)) as dist:
        quorum = dist.locks.redlock(os.environ["URLS"].split(","))
        try:
            held = await quorum.lock("job", ttl=30).acquire(timeout=float(os.environ["WAIT"]))
        except LockTimeout as exc:
            print("timeout:", exc)
            sys.exit(1)
        print("acquired", held.fence)
        await held.release()

asyncio.run(main())
"""


async def test_grants_of_servers_that_answer_late_are_undone_once_they_answer(
    make_dist, three_servers: list[RedisServer], processes: ProcessGroup, namespace: str
) -> None:
    """A majority paused during an attempt runs its grant when it wakes, after the
    release meant to undo it: that stray lease must not block everyone for a ttl."""
    dist: Dist = await make_dist(postgres=None, sessions=False)
    urls = [s.url for s in three_servers]
    quorum = dist.locks.redlock(urls)
    warm = await quorum.lock("warm", ttl=5).acquire()  # connections to every server
    await warm.release()
    for server in three_servers[1:]:
        server.pause()
    try:
        with pytest.raises(BackendUnavailable, match="majority"):
            await quorum.lock("job", ttl=30).acquire(timeout=0)
        await asyncio.sleep(0.3)
    finally:
        for server in three_servers[1:]:
            server.resume()
    # Another process asks for it well within the stray grants' ttl (30 s).
    env = {"NS": namespace, "URLS": ",".join(urls), "WAIT": "5"}
    [contender] = processes.python(CONTENDER, env=env)
    assert await asyncio.to_thread(contender.wait, 60) == 0, contender.output()
    assert "acquired" in contender.output()
    for server in three_servers:
        assert server.cli("keys", "*lease*") == ""
