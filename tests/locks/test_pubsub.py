"""The shared pub/sub hub: one connection per process, demultiplexed, self-healing."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from asgi_dist import ConfigError, Dist
from tests.helpers.handoff import assert_handed_over, two_dists
from tests.helpers.servers import RedisServer


async def _eventually(check, bound: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + bound
    while not await check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def _connections_named(client: aioredis.Redis, name: str) -> int:
    return sum(1 for c in await client.client_list() if c.get("name") == name)


async def test_many_listeners_share_one_connection_and_each_gets_its_messages(
    make_dist, redis_client: aioredis.Redis
) -> None:
    dist: Dist = await make_dist(sessions=False)
    hub = dist.runtime.pubsub
    channels = [f"{dist.namespace}:ch{i}" for i in range(40)]
    received: dict[str, list[bytes | None]] = {c: [] for c in channels}
    twice: list[bytes | None] = []
    subs = [await hub.subscribe(c, received[c].append) for c in channels]
    subs.append(await hub.subscribe(channels[0], twice.append))
    for c in channels:
        await redis_client.publish(c, c.encode())

    async def all_delivered() -> bool:
        return all(received[c] == [c.encode()] for c in channels) and len(twice) == 1

    await _eventually(all_delivered)
    assert twice == [channels[0].encode()]
    assert await _connections_named(redis_client, hub.client_name) == 1
    for sub in subs:
        sub.close()

    async def unsubscribed() -> bool:
        counts = await redis_client.pubsub_numsub(*channels)
        return all(n == 0 for _, n in counts)

    await _eventually(unsubscribed)
    assert hub.channels == frozenset()


async def test_a_subscription_is_acknowledged_before_subscribe_returns(make_dist) -> None:
    dist: Dist = await make_dist(sessions=False)
    hub = dist.runtime.pubsub
    got: list[bytes | None] = []
    subs = []
    for i in range(20):
        channel = f"{dist.namespace}:ack{i}"
        subs.append(await hub.subscribe(channel, got.append))
        # Published right after subscribe() returned: Redis already counts us.
        assert await hub.publish(channel, b"x") == 1
    await _eventually(lambda: _true_if(len(got) == 20))
    for sub in subs:
        sub.close()


async def _true_if(value: bool) -> bool:
    return value


@pytest.mark.parametrize("link", ["resp", "redis-py"])
async def test_reconnect_restores_channels_and_tells_listeners_they_may_have_missed_messages(
    make_dist, redis_server: RedisServer, link: str
) -> None:
    # A URL gets the hub's own RESP connection; an app's client, redis-py's.
    app_client = aioredis.Redis.from_url(redis_server.url) if link == "redis-py" else None
    dist: Dist = await make_dist(
        redis=app_client or redis_server.url, postgres=None, sessions=False
    )
    hub = dist.runtime.pubsub
    assert (dist.runtime.redis.multiplexed is None) == (link == "redis-py")
    got: list[bytes | None] = []
    await hub.subscribe("news", got.append)
    redis_server.cli("client", "kill", "type", "pubsub")
    await _eventually(lambda: _true_if(None in got))
    publisher = aioredis.Redis.from_url(redis_server.url)
    try:
        await publisher.publish("news", b"after")
        await _eventually(lambda: _true_if(b"after" in got))
    finally:
        await publisher.aclose()
        if app_client is not None:
            await app_client.aclose()
    assert hub.reconnects >= 1


async def test_hub_survives_a_server_restart(make_dist, redis_server: RedisServer) -> None:
    dist: Dist = await make_dist(redis=redis_server.url, postgres=None, sessions=False)
    hub = dist.runtime.pubsub
    got: list[bytes | None] = []
    await hub.subscribe("news", got.append)
    redis_server.restart()
    publisher = aioredis.Redis.from_url(redis_server.url)
    try:

        async def delivered() -> bool:
            await publisher.publish("news", b"back")
            return b"back" in got

        await _eventually(delivered, 15)
    finally:
        await publisher.aclose()


async def test_hub_works_with_a_cluster_client(make_dist, cluster_url: str) -> None:
    dist: Dist = await make_dist(redis=cluster_url, postgres=None, sessions=False)
    hub = dist.runtime.pubsub
    got: list[bytes | None] = []
    channels = [f"c{i}" for i in range(10)]
    for c in channels:
        await hub.subscribe(c, got.append)
    for c in channels:
        # Published through the cluster client (any node): classic pub/sub is broadcast.
        await hub.publish(c, c)
    await _eventually(lambda: _true_if(sorted(got) == sorted(c.encode() for c in channels)))


async def test_heartbeat_replaces_a_silent_connection(redis_server: RedisServer) -> None:
    from asgi_dist.backends.pubsub import PubSubHub
    from asgi_dist.backends.redis import RedisBackend

    backend = RedisBackend(redis_server.url, namespace="hb")
    hub = PubSubHub(backend, heartbeat=0.2, max_backoff=0.2)
    got: list[bytes | None] = []
    try:
        await hub.subscribe("news", got.append)
        redis_server.pause()  # SIGSTOP: the socket stays open but nothing answers
        await asyncio.sleep(1.2)  # > 2.5 heartbeats: the hub gives the connection up
        redis_server.resume()
        await _eventually(lambda: _true_if(None in got))  # resubscribed, told to re-check
        assert hub.reconnects >= 1
        publisher = aioredis.Redis.from_url(redis_server.url)
        try:
            await publisher.publish("news", b"fresh")
        finally:
            await publisher.aclose()
        await _eventually(lambda: _true_if(b"fresh" in got))
    finally:
        await hub.close()
        await backend.stop()


@pytest.mark.parametrize("where", ["password and database", "unix socket"])
async def test_hub_and_lock_wake_ups_over_a_password_or_a_unix_socket(
    make_dist, tmp_path, where: str
) -> None:
    # The hub's own RESP connection carries the URL's AUTH (and SELECT) too, or
    # goes through a unix socket; a waiter is woken and handed the lease by it.
    if where == "unix socket":
        sock = tmp_path / "redis.sock"
        server = RedisServer("--unixsocket", str(sock), "--unixsocketperm", "700").start()
        url = f"unix://{sock}?db=2"
    else:
        server = RedisServer("--requirepass", "s3cret").start()
        url = f"redis://:s3cret@127.0.0.1:{server.port}/2"
    try:
        async with two_dists(make_dist, url) as (first, second):
            assert first.runtime.redis.multiplexed is not None
            got: list[bytes | None] = []
            await first.runtime.pubsub.subscribe("news", got.append)
            assert await second.runtime.pubsub.publish("news", b"hi") == 1
            await _eventually(lambda: _true_if(got == [b"hi"]))
            await assert_handed_over(first, second)
    finally:
        server.close()


async def test_a_redis_user_without_channel_rights_is_refused_at_start_with_the_fix(
    namespace: str,
) -> None:
    # Redis 7 gives a new ACL user no pub/sub channels: releases would fail and
    # waiters would never be woken, so the Dist refuses to start and says why.
    server = RedisServer().start()
    try:
        server.cli("ACL", "SETUSER", "app", "on", ">pw", "~*", "+@all", "resetchannels")
        url = f"redis://app:pw@127.0.0.1:{server.port}/0"
        dist = Dist(redis=url, postgres=None, namespace=namespace, sessions=False)
        with pytest.raises(ConfigError, match=r"ACL SETUSER <user> '&t_\w+\*' '&\{t_\w+\*'"):
            await dist.start()

        server.cli("ACL", "SETUSER", "app", f"&{namespace}*", f"&{{{namespace}*")
        first, second = (
            Dist(redis=url, postgres=None, namespace=namespace, sessions=False) for _ in "12"
        )
        async with first, second:  # the namespace's channels are enough
            # The release publishes the hand-off on the other Dist's process channel.
            await assert_handed_over(first, second)
    finally:
        server.close()


async def test_a_redis_user_without_the_hash_tagged_keys_is_refused_at_start_with_the_fix(
    namespace: str,
) -> None:
    # A grant of '~ns:*' misses the keys that carry a {hash tag}: the first lock or
    # session would fail with a raw NOPERM, so the Dist refuses to start instead.
    server = RedisServer().start()
    try:
        server.cli(
            "ACL", "SETUSER", "app", "on", ">pw", f"~{namespace}:*", "&*", "+@all",
        )  # fmt: skip
        url = f"redis://app:pw@127.0.0.1:{server.port}/0"
        dist = Dist(redis=url, postgres=None, namespace=namespace, sessions=False)
        with pytest.raises(ConfigError, match=r"ACL SETUSER <user> '~t_\w+\*' '~\{t_\w+\*'"):
            await dist.start()
        server.cli("ACL", "SETUSER", "app", f"~{{{namespace}*")
        async with Dist(redis=url, postgres=None, namespace=namespace, sessions=False) as dist:
            async with dist.lock("x") as held:
                assert held.fence >= 1
    finally:
        server.close()


@pytest.mark.parametrize("link", ["resp", "redis-py"])
async def test_a_refused_subscribe_fails_the_subscriber_instead_of_leaving_it_waiting(
    namespace: str, link: str
) -> None:
    server = RedisServer().start()
    app_client = None
    try:
        server.cli(
            "ACL", "SETUSER", "app", "on", ">pw", "~*", "+@all", "resetchannels",
            f"&{namespace}*", f"&{{{namespace}*",
        )  # fmt: skip
        url = f"redis://app:pw@127.0.0.1:{server.port}/0"
        app_client = aioredis.Redis.from_url(url) if link == "redis-py" else None
        dist = Dist(redis=app_client or url, postgres=None, namespace=namespace, sessions=False)
        async with dist:
            hub = dist.runtime.pubsub
            got: list[bytes | None] = []
            # Both unanswered at once: the error answers the refused one only.
            ok, refused = await asyncio.wait_for(
                asyncio.gather(
                    hub.subscribe(f"{namespace}:ok", got.append),
                    hub.subscribe("not-granted", got.append),
                    return_exceptions=True,
                ),
                5,
            )
            assert isinstance(refused, ConfigError)
            assert "subscribe to not-granted (" in str(refused)
            assert "no permissions" in str(refused)
            assert "not-granted" not in hub.channels
            # The hub goes on serving the channels the user may use.
            assert not isinstance(ok, BaseException)
            assert await hub.publish(f"{namespace}:ok", b"yes") == 1
            await _eventually(lambda: _true_if(got == [b"yes"]))
    finally:
        if app_client is not None:
            await app_client.aclose()
        server.close()
