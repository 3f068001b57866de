"""Relays and consumers in real OS processes: shared work, kills, exactly-once effects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.transactions import Transaction
from tests.helpers.processes import ProcessGroup
from tests.transactions.settings import FAST
from tests.transactions.waiting import eventually
from tests.transactions.workers import WORKER

KEYS = 20


def worker_env(dist: Dist, redis_url: str, dsn: str, state: Path, **extra: str) -> dict[str, str]:
    return {
        "ASGI_DIST_REDIS_URL": redis_url,
        "ASGI_DIST_POSTGRES_DSN": dsn,
        "ASGI_DIST_NAMESPACE": dist.namespace,
        "WORKER_STATE": str(state),
        **extra,
    }


async def wait_files(paths: list[Path], group: ProcessGroup) -> None:
    async def ready() -> bool:
        return all(p.exists() for p in paths)

    try:
        await eventually(ready, 30, "workers ready")
    except AssertionError:
        raise AssertionError("\n".join(w.output() for w in group.workers)) from None


async def publish_all(dist: Dist, total: int, per_tx: int = 50) -> list[str]:
    """``total`` messages on ``work``, keys round-robin, ``n`` counting per key."""
    pool = dist.runtime.require_postgres("test").pool
    ids: list[str] = []
    for start in range(0, total, per_tx):
        async with pool.acquire() as conn, conn.transaction():
            tx = Transaction(dist.transactions.outbox, conn)
            for i in range(start, min(total, start + per_tx)):
                ids.append(await tx.publish("work", {"n": i // KEYS}, key=f"k{i % KEYS}"))
    return ids


async def setup(make_dist: Callable[..., Any], pg: asyncpg.Connection) -> Dist:
    # The test process only publishes: relays and consumers are the workers.
    dist: Dist = await make_dist(transactions=replace(FAST, relay=False))
    await pg.execute(
        f"CREATE TABLE {dist.namespace}_effects (msg_id uuid, key text, n int, pid int)"
    )
    return dist


@dataclass
class Relayed:
    """A Dist whose outbox one relay process publishes to the stream of topic 'work'."""

    dist: Dist
    env: dict[str, str]
    redis: aioredis.Redis

    @property
    def stream(self) -> str:
        return f"{{{self.dist.namespace}:topic:work}}:stream"

    async def pending(self) -> int:
        """Entries of group 'g' delivered and not yet acknowledged."""
        return int((await self.redis.xpending(self.stream, "g"))["pending"])

    async def dead_letters(self) -> int:
        return int(await self.redis.xlen(f"{{{self.dist.namespace}:topic:work}}:dead:g"))


async def relayed(
    make_dist: Callable[..., Any],
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    redis_url: str,
    dsn: str,
    state: Path,
) -> Relayed:
    dist = await setup(make_dist, pg)
    env = worker_env(dist, redis_url, dsn, state)
    processes.python(WORKER, 1, env, args=["relay"])
    return Relayed(dist, env, redis_client)


async def count(pg: asyncpg.Connection, sql: str) -> int:
    n: int = await pg.fetchval(sql)
    return n


def assert_per_key_order(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
    """In the stream, each key's messages appear in publish order (first occurrences)."""
    seen: set[bytes] = set()
    last: dict[bytes, int] = {}
    for _, fields in entries:
        if fields[b"id"] in seen:
            continue  # a re-publication: consumers drop it by id
        seen.add(fields[b"id"])
        n = json.loads(fields[b"payload"])["n"]
        assert n == last.get(fields[b"key"], -1) + 1, f"key {fields[b'key']!r} out of order"
        last[fields[b"key"]] = n


async def test_two_relays_and_three_consumers_lose_and_duplicate_nothing(
    make_dist: Callable[..., Any],
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    dist = await setup(make_dist, pg)
    ns = dist.namespace
    env = worker_env(dist, redis_url, postgres_dsn, tmp_path)
    processes.python(WORKER, 2, env, args=["relay"])
    processes.python(WORKER, 3, env, args=["consumer"])
    await wait_files([tmp_path / f"consumer-{i}.ready" for i in range(3)], processes)
    ids = await publish_all(dist, 2000)

    async def all_handled() -> bool:
        return await count(pg, f"SELECT count(*) FROM {ns}_effects") >= 2000

    await eventually(all_handled, 60, "2000 effects")
    await asyncio.sleep(0.5)  # a duplicate effect would have time to show up
    rows = await pg.fetch(f"SELECT msg_id::text AS id, pid FROM {ns}_effects")
    assert sorted(r["id"] for r in rows) == sorted(ids)  # each message exactly once
    assert len({r["pid"] for r in rows}) == 3  # the group shared the work
    relayed = [int((tmp_path / f"relay-{i}.count").read_text()) for i in range(2)]
    assert sum(relayed) == 2000 and min(relayed) > 0, relayed  # both relays, no double marks
    entries = await redis_client.xrange(f"{{{ns}:topic:work}}:stream")
    assert {f[b"id"].decode() for _, f in entries} == set(ids)
    assert_per_key_order(entries)


async def test_killed_relay_and_consumer_before_ack_lose_and_duplicate_nothing(
    make_dist: Callable[..., Any],
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    dist = await setup(make_dist, pg)
    ns = dist.namespace
    stream = f"{{{ns}:topic:work}}:stream"
    env = worker_env(dist, redis_url, postgres_dsn, tmp_path, RELAY_BATCH="50")
    # C1 commits its effects but never acks: every message it took is redelivered.
    (c1,) = processes.python(WORKER, 1, env, args=["consumer", "never-ack"])
    await wait_files([tmp_path / "consumer-0.ready"], processes)
    total = 600
    ids = await publish_all(dist, total)
    published = f"SELECT count(*) FROM {ns}_outbox WHERE published_at IS NOT NULL"

    (r1,) = processes.python(WORKER, 1, env, args=["relay"])
    await eventually(lambda: _gt(count(pg, published), 0), 30, "relay 1 started")
    r1.kill()  # SIGKILL while it is relaying (batches of 50)
    at_kill = await count(pg, published)
    assert 0 < at_kill < total
    processes.python(WORKER, 1, env, args=["relay"])
    await eventually(lambda: _eq(count(pg, published), total), 30, "relay 2 finished")

    async def c1_done() -> bool:
        return await count(pg, f"SELECT count(*) FROM {ns}_effects") >= total

    await eventually(c1_done, 30, "consumer 1 committed everything")
    assert (await redis_client.xpending(stream, "g"))["pending"] >= total
    c1.kill()  # before any ack
    env2 = {**env, "WORKER_STATE": str(tmp_path / "c2")}
    (tmp_path / "c2").mkdir()
    processes.python(WORKER, 1, env2, args=["consumer"])

    async def all_acked() -> bool:
        return bool((await redis_client.xpending(stream, "g"))["pending"] == 0)

    await eventually(all_acked, 30, "consumer 2 reclaimed and acked everything")
    rows = await pg.fetch(f"SELECT msg_id::text AS id, pid FROM {ns}_effects")
    assert sorted(r["id"] for r in rows) == sorted(ids)  # exactly once, all by C1
    assert {r["pid"] for r in rows} == {c1.pid}
    entries = await redis_client.xrange(stream)
    assert {f[b"id"].decode() for _, f in entries} == set(ids)  # nothing lost
    assert_per_key_order(entries)


async def _gt(value: Any, than: int) -> bool:
    return bool(await value > than)


async def _eq(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_a_dead_consumers_entries_are_reclaimed_past_many_live_ones(
    make_dist: Callable[..., Any],
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    """Twelve entries held by two live, slow members head the group's pending list; a
    killed member's five come after them.  A member taking one entry at a time
    (XAUTOCLAIM scans ten pending entries per entry asked) must still find those five."""
    group = await relayed(make_dist, pg, redis_client, processes, redis_url, postgres_dsn, tmp_path)
    dist, env, ns = group.dist, group.env, group.dist.namespace
    live = processes.python(WORKER, 2, env, args=["blocker", "6"])
    await wait_files([tmp_path / f"blocker-{w.pid}.ready" for w in live], processes)

    async def pending(n: int) -> bool:
        return await group.pending() == n

    await publish_all(dist, 12)
    await eventually(lambda: pending(12), 30, "the live members hold 12 entries")
    (doomed,) = processes.python(WORKER, 1, env, args=["blocker", "5"])
    await wait_files([tmp_path / f"blocker-{doomed.pid}.ready"], processes)
    ids = await publish_all(dist, 5)
    await eventually(lambda: pending(17), 30, "the doomed member holds 5 entries")
    doomed.kill()
    processes.python(WORKER, 1, {**env, "CONCURRENCY": "1"}, args=["consumer"])

    async def handled() -> bool:
        return await count(pg, f"SELECT count(*) FROM {ns}_effects") >= 5

    # reclaim_after is 2 s; the live members' entries stay pending all along.
    await eventually(handled, 20, "the killed member's entries reclaimed and handled")
    rows = await pg.fetch(f"SELECT msg_id::text AS id FROM {ns}_effects")
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert await group.pending() == 12


async def test_a_graceful_stop_hands_its_messages_over_without_spending_an_attempt(
    make_dist: Callable[..., Any],
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    """A member stopped by SIGTERM (a deploy) in the middle of its handlers: the group
    handles those messages once, and with max_deliveries=1 none is dead-lettered for
    a delivery that never failed."""
    group = await relayed(make_dist, pg, redis_client, processes, redis_url, postgres_dsn, tmp_path)
    dist, env, ns = group.dist, group.env, group.dist.namespace
    (stopping,) = processes.python(WORKER, 1, env, args=["blocker", "3"])
    await wait_files([tmp_path / f"blocker-{stopping.pid}.ready"], processes)
    ids = await publish_all(dist, 3)

    async def held() -> bool:
        return await group.pending() == 3

    await eventually(held, 30, "the stopping member runs 3 handlers")
    assert stopping.terminate() == 0, stopping.output()
    processes.python(WORKER, 1, {**env, "MAX_DELIVERIES": "1"}, args=["consumer"])

    async def handled() -> bool:
        return await count(pg, f"SELECT count(*) FROM {ns}_effects") >= 3

    await eventually(handled, 20, "the stopped member's messages handled by the other")
    rows = await pg.fetch(f"SELECT msg_id::text AS id FROM {ns}_effects")
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert await group.dead_letters() == 0


async def test_a_message_still_running_in_a_stalled_member_is_not_dead_lettered(
    make_dist: Callable[..., Any],
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    redis_url: str,
    postgres_dsn: str,
    tmp_path: Path,
) -> None:
    """A handler blocks its process's event loop past reclaim_after (2 s), so another
    member reclaims its message as a second delivery, past max_deliveries=1.  The
    message is still running, and succeeds: it is handled once and not dead-lettered."""
    group = await relayed(make_dist, pg, redis_client, processes, redis_url, postgres_dsn, tmp_path)
    dist, env, ns = group.dist, group.env, group.dist.namespace
    (stalled,) = processes.python(WORKER, 1, env, args=["stalling", "8"])
    await wait_files([tmp_path / f"stalling-{stalled.pid}.ready"], processes)
    ids = await publish_all(dist, 1)

    async def taken() -> bool:
        return await group.pending() == 1

    await eventually(taken, 30, "the stalling member runs the message")
    (other,) = processes.python(WORKER, 1, env, args=["stalling", "0"])
    await wait_files([tmp_path / f"stalling-{other.pid}.ready"], processes)

    async def settled() -> bool:
        acked = await group.pending() == 0
        return acked and await count(pg, f"SELECT count(*) FROM {ns}_effects") == 1

    await eventually(settled, 30, "the message handled and acked")
    rows = await pg.fetch(f"SELECT msg_id::text AS id, pid FROM {ns}_effects")
    assert [(r["id"], r["pid"]) for r in rows] == [(ids[0], stalled.pid)]
    assert await group.dead_letters() == 0
