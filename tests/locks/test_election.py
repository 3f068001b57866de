"""Leader election: one leader at a time across real processes, fenced terms, fast hand-over."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
import redis.asyncio as aioredis

from asgi_dist import ConfigError, Dist, LockLost
from tests.helpers.processes import ProcessGroup, Worker

# A process that campaigns forever and logs every term to a Redis list with the
# server's clock: "start" on winning, "tick" every 50 ms, "resign" when leaving
# on SIGTERM.
CANDIDATE = """
import asyncio, json, os, signal, sys
import redis.asyncio as aioredis
from asgi_dist import Dist, LockLost

INDEX = int(sys.argv[1])
NS = os.environ["NS"]
TTL = float(os.environ["TTL"])

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    log = aioredis.Redis.from_url(os.environ["REDIS"])
    async def record(event, fence):
        sec, usec = await log.time()
        await log.rpush(NS + ":log", json.dumps(
            {"i": INDEX, "pid": os.getpid(), "e": event, "fence": fence, "t": sec + usec / 1e6}))
    async with Dist(redis=os.environ["REDIS"], namespace=NS, sessions=False) as dist:
        election = dist.election("leader", ttl=TTL, renew_deadline=TTL * 0.6, retry=TTL * 0.15)
        await log.rpush(NS + ":ready", INDEX)
        while not stop.is_set():
            try:
                async with election.leadership() as term:
                    await record("start", term.fence)
                    while not stop.is_set():
                        await record("tick", term.fence)
                        try:
                            await asyncio.wait_for(stop.wait(), 0.05)
                        except TimeoutError:
                            pass
                    await record("resign", term.fence)
            except LockLost:
                await record("lost", 0)
    await log.aclose()

asyncio.run(main())
"""


async def _log(client: aioredis.Redis, ns: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in await client.lrange(f"{ns}:log", 0, -1)]


async def _wait_for(predicate, bound: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"gave up after {bound}s waiting for {what}")


def _assert_one_leader_at_a_time(entries: list[dict[str, object]]) -> None:
    """Terms, ordered by fence, occupy disjoint intervals of the server's clock."""
    terms: dict[int, list[float]] = {}
    for e in entries:
        if e["e"] in ("start", "tick", "resign"):
            terms.setdefault(int(e["fence"]), []).append(float(e["t"]))  # type: ignore[arg-type]
    fences = sorted(terms)
    assert len(fences) >= 2
    for earlier, later in itertools.pairwise(fences):
        assert max(terms[earlier]) < min(terms[later]), (
            f"term {earlier} overlapped term {later}: two leaders at once"
        )


async def _start(processes: ProcessGroup, redis_url: str, ns: str, ttl: float) -> list[Worker]:
    workers = processes.python(CANDIDATE, n=3, env={"NS": ns, "REDIS": redis_url, "TTL": str(ttl)})
    client = aioredis.Redis.from_url(redis_url)
    try:

        async def ready() -> bool:
            return int(await client.llen(f"{ns}:ready")) == 3

        await _wait_for(ready, 30, "3 candidates to start")
    finally:
        await client.aclose()
    return workers


async def _leader(client: aioredis.Redis, ns: str, after_fence: int) -> dict[str, object] | None:
    for e in reversed(await _log(client, ns)):
        if e["e"] == "start" and int(e["fence"]) > after_fence:  # type: ignore[call-overload]
            return e
    return None


async def test_killed_leader_is_replaced_by_a_single_new_leader_with_a_larger_term(
    processes: ProcessGroup, redis_url: str, redis_client: aioredis.Redis, namespace: str
) -> None:
    ttl = 2.0
    workers = await _start(processes, redis_url, namespace, ttl)
    first = await _wait_for(lambda: _leader(redis_client, namespace, 0), 10, "a first leader")
    await asyncio.sleep(0.3)
    by_index = {i: w for i, w in enumerate(workers)}
    killed_at = time.monotonic()
    by_index[int(first["i"])].kill()  # type: ignore[call-overload]
    second = await _wait_for(
        lambda: _leader(redis_client, namespace, int(first["fence"])),  # type: ignore[call-overload]
        4 * ttl,
        "a new leader after SIGKILL",
    )
    print(f"\nfailover after SIGKILL: {time.monotonic() - killed_at:.2f}s (ttl {ttl}s)")
    await asyncio.sleep(0.3)
    for w in workers:
        w.kill()
    entries = await _log(redis_client, namespace)
    assert second["i"] != first["i"]
    assert int(second["fence"]) > int(first["fence"])  # type: ignore[call-overload]
    _assert_one_leader_at_a_time(entries)


async def test_resigning_leader_hands_over_without_waiting_for_its_ttl(
    processes: ProcessGroup, redis_url: str, redis_client: aioredis.Redis, namespace: str
) -> None:
    # A 60 s lease: a successor within the 10 s bound can only come from the
    # resignation waking the followers, not from the lease expiring.
    ttl = 60.0
    workers = await _start(processes, redis_url, namespace, ttl)
    first = await _wait_for(lambda: _leader(redis_client, namespace, 0), 10, "a first leader")
    leader = workers[int(first["i"])]  # type: ignore[call-overload]
    assert leader.terminate() == 0
    second = await _wait_for(
        lambda: _leader(redis_client, namespace, int(first["fence"])),  # type: ignore[call-overload]
        10,
        "a successor after a graceful stop",
    )
    entries = await _log(redis_client, namespace)
    resigned = [e for e in entries if e["e"] == "resign" and e["fence"] == first["fence"]]
    assert resigned, "the stopped leader did not resign"
    gap = float(second["t"]) - float(resigned[0]["t"])  # type: ignore[arg-type]
    print(f"\ngraceful hand-over: {gap * 1000:.1f} ms (ttl {ttl:g}s)")
    for w in workers:
        w.kill()
    _assert_one_leader_at_a_time(await _log(redis_client, namespace))


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_terms_are_fenced_and_leaving_the_block_resigns(make_dist, backend: str) -> None:
    dist: Dist = await make_dist(sessions=False)
    other: Dist = await make_dist(sessions=False)
    a = dist.election("e", ttl=5, renew_deadline=3, retry=1, backend=backend)  # type: ignore[arg-type]
    b = other.election("e", ttl=5, renew_deadline=3, retry=1, backend=backend)  # type: ignore[arg-type]
    async with a.leadership() as term:
        assert a.is_leader and not b.is_leader
        # Any Election object of this Dist and name sees the same leadership.
        assert dist.election("e", ttl=5, renew_deadline=3, retry=1, backend=backend).is_leader  # type: ignore[arg-type]
        assert await b.try_lead() is None
        assert await b.leader() == dist.node_id
    assert not a.is_leader
    second = await b.try_lead()
    assert second is not None and second.fence > term.fence
    assert await a.leader() == other.node_id
    await second.release()
    assert await a.leader() is None
    # Nothing per name is kept once no term of it lives (names may be many).
    assert not dist.locks._terms and not other.locks._terms


async def test_waiting_follower_is_woken_by_the_resignation(make_dist) -> None:
    dist: Dist = await make_dist(sessions=False)
    other: Dist = await make_dist(sessions=False)
    a = dist.election("e", ttl=60, renew_deadline=40, retry=20)
    b = other.election("e", ttl=60, renew_deadline=40, retry=20)
    term = await a.campaign()
    follower = asyncio.create_task(b.campaign())
    await asyncio.sleep(0.2)
    assert not follower.done()
    await term.release()
    # retry is 20 s and the lease 60 s: only the wake-up can elect it this soon.
    successor = await asyncio.wait_for(follower, 10)
    assert successor.fence > term.fence
    await successor.release()


async def test_lost_leadership_cancels_the_body_and_raises_lock_lost(
    make_dist, redis_client: aioredis.Redis
) -> None:
    dist: Dist = await make_dist(sessions=False)
    election = dist.election("e", ttl=1.5, renew_deadline=1.0, retry=0.2)
    body_cancelled = False
    with pytest.raises(LockLost):
        async with election.leadership() as term:
            # Another party takes the lease over (as after a partition).
            lease = f"{{{dist.namespace}:election:e}}:lease"
            await redis_client.hset(lease, "token", "usurper@elsewhere")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                body_cancelled = True
                raise
    assert body_cancelled
    assert term.lost.is_set()
    assert not election.is_leader


def test_election_timings_are_validated() -> None:
    dist = Dist(sessions=False, leader_ttl=15)
    election = dist.election("x")
    assert (election.ttl, election.renew_deadline, election.retry) == (15.0, 10.0, 2.0)
    with pytest.raises(ConfigError, match="renew_deadline"):
        dist.election("x", ttl=5, renew_deadline=6)
    with pytest.raises(ConfigError, match="retry"):
        dist.election("x", ttl=5, renew_deadline=2, retry=2)


async def test_run_campaigns_again_after_a_lost_term(
    make_dist, redis_client: aioredis.Redis
) -> None:
    dist: Dist = await make_dist(sessions=False)
    election = dist.election("e", ttl=1.5, renew_deadline=1.0, retry=0.2)
    lease = f"{{{dist.namespace}:election:e}}:lease"
    fences: list[int] = []

    async def body(term) -> None:  # type: ignore[no-untyped-def]
        fences.append(term.fence)
        if len(fences) == 1:
            # Usurped for 0.5 s: this term is lost, the next campaign wins.
            await redis_client.hset(lease, "token", "usurper@elsewhere")
            await redis_client.pexpire(lease, 500)
            await asyncio.sleep(30)

    await asyncio.wait_for(election.run(body), 20)
    assert len(fences) == 2 and fences[1] > fences[0]
    assert not election.is_leader


async def test_an_idle_follower_attempts_about_once_per_lease_period(
    make_dist, redis_server
) -> None:
    """A follower sleeps on the pub/sub wake-up bounded by the leader's lease.

    The leader is simulated from outside (a lease hash kept alive with PEXPIRE),
    so every EVALSHA the private server counts is the follower's attempt.
    """
    ttl = 1.0
    dist: Dist = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    admin = aioredis.Redis.from_url(redis_server.url)
    redis = dist.locks.runtime.redis
    assert redis is not None
    lease = redis.key("election", "idle", "lease")
    await admin.hset(lease, mapping={"token": "outsider@elsewhere", "fence": 1})
    await admin.pexpire(lease, int(ttl * 1000))
    election = dist.election("idle", ttl=ttl, renew_deadline=0.6, retry=0.15)
    follower = asyncio.create_task(election.campaign())

    async def attempts() -> int:
        stats = await admin.info("commandstats")
        return sum(stats.get(k, {}).get("calls", 0) for k in ("cmdstat_evalsha", "cmdstat_eval"))

    periods = 3
    try:
        await asyncio.sleep(0.3)
        before = await attempts()
        for _ in range(round(periods * ttl / 0.15)):
            await admin.pexpire(lease, int(ttl * 1000))  # the leader renewing every retry
            await asyncio.sleep(0.15)
        sent = await attempts() - before
        assert not follower.done()
        # Polling every retry would be ~20; waiting on the lease ~1 per period.
        assert sent <= 2 * periods, f"{sent} attempts in {periods} lease periods"
        # The resignation's publish still wakes it at once (the lease had ~1 s left).
        await admin.delete(lease)
        await admin.publish(redis.key("election", "idle", "wake"), "released:outsider")
        term = await asyncio.wait_for(follower, 0.9)
        assert term.owner == dist.node_id
        await term.release()
    finally:
        follower.cancel()
        await admin.aclose()
