"""Redis backend: URL forms, tagged keys, and Lua scripts on single, Sentinel and Cluster."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from asgi_dist import ConfigError, Dist
from asgi_dist.backends.redis import RedisBackend, describe_redis_url
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
