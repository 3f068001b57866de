"""Redis backend: URL forms, tagged keys, and Lua scripts on single, Sentinel and Cluster."""

from __future__ import annotations

import pytest
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from asgi_dist import ConfigError, Dist
from asgi_dist.backends.redis import (
    LONGEST_BLOCK,
    RedisBackend,
    block_ms,
    create_redis_client,
    describe_redis_url,
    read_timeout,
)
from tests.helpers.servers import RedisServer, redis_sentinel

KEYS = ["a-test-secret-key-of-32-chars-xx"]


def test_keys_share_one_hash_tag_per_object() -> None:
    backend = RedisBackend("redis://127.0.0.1:6379", namespace="shop")
    assert backend.key("lock", "sku:42") == "{shop:lock:sku:42}"
    assert backend.key("lock", "sku:42", "fence") == "{shop:lock:sku:42}:fence"


@pytest.mark.parametrize("name", ["", "a\nb", "x" * 513, "a{b}", "\x7f"])
def test_names_that_cannot_be_keys_are_refused(name: str) -> None:
    backend = RedisBackend("redis://127.0.0.1:6379", namespace="shop")
    with pytest.raises(ConfigError):
        backend.key("lock", name)


def test_urls_are_described_without_credentials() -> None:
    assert describe_redis_url("redis://:pw@10.0.0.1:6380/1") == "redis://10.0.0.1:6380"
    assert describe_redis_url("unix://:pw@/run/redis.sock?db=2") == "unix:///run/redis.sock"
    assert (
        describe_redis_url("redis+sentinel://u:pw@h1:26379,h2:26380/mymaster/2")
        == "redis+sentinel://h1:26379,h2:26380"
    )
    assert describe_redis_url("redis+cluster://h1:7000,h2") == "redis+cluster://h1:7000,h2:6379"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://127.0.0.1:6380",
        "unix:///run/redis.sock",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
        "redis+sentinel://127.0.0.1:26379/mymaster/1",
    ],
)
async def test_every_client_bounds_each_reply_beyond_the_longest_block(url: str) -> None:
    """A Redis that stops answering with its connections open must not hang a command
    for the ~15 minutes TCP takes to give up (redis-py before 8 sets no timeout)."""
    client = create_redis_client(url, connect_timeout=2.0)
    try:
        if isinstance(client, RedisCluster):
            nodes = client.nodes_manager.startup_nodes.values()
            timeouts = {n.connection_kwargs["socket_timeout"] for n in nodes}
        else:  # a connection as the pool makes it (Sentinel's included)
            timeouts = {client.connection_pool.make_connection().socket_timeout}
    finally:
        await client.aclose()
    assert timeouts == {read_timeout(2.0)} == {2.0 + LONGEST_BLOCK}
    # The tests behind a black-holing proxy count on this bound.
    assert read_timeout(1.0) == 5.0


async def test_a_read_that_timed_out_drops_its_connection_and_its_late_reply(
    redis_url: str, namespace: str
) -> None:
    """The reply of a command that timed out may still arrive: its connection must not
    serve the next command, which would read that reply as its own."""
    client = create_redis_client(redis_url, connect_timeout=0.5)  # replies within 4.5 s
    stream = f"{{{namespace}}}:late"
    try:
        with pytest.raises(redis_errors.TimeoutError):
            # A block past the read timeout: Redis answers only after we gave up.
            await client.xread({stream: "$"}, block=6000)
        for i in range(5):
            assert await client.echo(f"mine-{i}") == f"mine-{i}".encode()
        await client.xadd(stream, {"n": "1"})  # would complete the old read now
        for i in range(5):
            assert await client.echo(f"still-{i}") == f"still-{i}".encode()
    finally:
        await client.delete(stream)
        await client.aclose()


@pytest.mark.parametrize(
    ("seconds", "expected"), [(0.1, 100), (0.0001, 1), (4.0, 4000), (86_400.0, 4000)]
)
def test_blocking_reads_block_less_than_the_read_timeout_and_never_forever(
    seconds: float, expected: int
) -> None:
    assert block_ms(seconds) == expected  # BLOCK 0 would wait for good


async def _run_probe(dist: Dist, name: str) -> int:
    redis = dist.runtime.redis
    assert redis is not None
    script = redis.script("tests.backends", "probe")
    keys = [redis.key("probe", name, "n"), redis.key("probe", name, "last")]
    return int(await script(redis.client, keys, [2]))


async def test_script_runs_on_single_redis_and_survives_script_flush(
    redis_server: RedisServer,
) -> None:
    async with Dist(redis=redis_server.url, secret_keys=KEYS, namespace="probe") as dist:
        assert await _run_probe(dist, "a") == 2
        redis_server.cli("SCRIPT", "FLUSH")  # as after a restart or failover
        assert await _run_probe(dist, "a") == 4


async def test_script_runs_on_a_three_master_cluster(cluster_url: str, namespace: str) -> None:
    async with Dist(redis=cluster_url, secret_keys=KEYS, namespace=namespace) as dist:
        assert dist.runtime.redis is not None
        client = dist.runtime.redis.client
        assert isinstance(client, RedisCluster)
        names = [f"object-{i}" for i in range(30)]
        slots = {client.keyslot(dist.runtime.redis.key("probe", n)) for n in names}
        nodes = {client.get_node_from_key(dist.runtime.redis.key("probe", n)).name for n in names}
        assert len(nodes) == 3, "the objects should spread over all three masters"
        assert len(slots) > 3
        for name in names:
            assert await _run_probe(dist, name) == 2
            assert await _run_probe(dist, name) == 4


async def test_sentinel_url_finds_the_primary(namespace: str) -> None:
    with redis_sentinel("mymaster") as (primary, sentinel):
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
        async with Dist(redis=url, secret_keys=KEYS, namespace=namespace) as dist:
            assert await _run_probe(dist, "s") == 2
        assert primary.cli("GET", f"{{{namespace}:probe:s}}:n") == "2"


async def test_an_existing_client_is_used_and_left_open(redis_url: str, namespace: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    async with Dist(redis=client, secret_keys=KEYS, namespace=namespace) as dist:
        assert await _run_probe(dist, "c") == 2
    assert await client.ping()  # the Dist did not close what it did not open
    await client.delete(f"{{{namespace}:probe:c}}:n", f"{{{namespace}:probe:c}}:last")
    await client.aclose()
