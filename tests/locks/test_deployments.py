"""The lock on other deployment shapes, and the watchdog's batching."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from asgi_dist import Dist, LockTimeout
from asgi_dist.locks.backend import Renewal
from asgi_dist.locks.redis import RedisLeases
from tests.helpers.handoff import assert_handed_over, two_dists
from tests.helpers.servers import RedisServer, free_port, redis_sentinel


async def test_lock_and_election_work_behind_sentinel(make_dist) -> None:
    with redis_sentinel("locks") as (_primary, sentinel):
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/locks"
        dist: Dist = await make_dist(redis=url, postgres=None, sessions=False)
        other: Dist = await make_dist(redis=url, postgres=None, sessions=False)
        await assert_handed_over(dist, other)  # woken through pub/sub behind Sentinel
        async with dist.election("e", ttl=5, renew_deadline=3, retry=1).leadership() as term:
            assert term.fence >= 1
            assert await other.election("e", ttl=5, renew_deadline=3, retry=1).try_lead() is None


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_lock_and_its_pubsub_wake_up_work_over_tls(
    make_dist, certificate: tuple[Path, Path]
) -> None:
    # rediss:// goes through redis-py alone (commands and the hub's connection).
    cert, key = certificate
    tls_port = free_port()
    server = RedisServer(
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
    ).start()  # fmt: skip
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
    try:
        async with two_dists(make_dist, url) as (dist, other):
            assert dist.runtime.redis is not None and dist.runtime.redis.multiplexed is None
            await assert_handed_over(dist, other)  # woken through pub/sub over TLS
    finally:
        server.close()


async def test_watchdog_renews_every_held_lock_in_one_round_trip_per_tick(make_dist) -> None:
    dist: Dist = await make_dist(postgres=None, sessions=False)
    backend = dist.locks.backend("redis")
    assert isinstance(backend, RedisLeases)
    batches: list[int] = []
    original = backend.renew_many

    async def counting(leases: list[Renewal]) -> list[bool | BaseException]:
        batches.append(len(leases))
        return await original(leases)

    backend.renew_many = counting  # type: ignore[method-assign,assignment]
    helds = [await dist.lock(f"k{i}", ttl=1.2).acquire() for i in range(20)]
    await asyncio.sleep(2.0)  # several renewal periods (ttl/3 = 0.4 s) past the ttl
    assert all(not h.lost.is_set() for h in helds)
    with pytest.raises(LockTimeout):
        await dist.lock("k7").acquire(timeout=0)
    assert len(batches) >= 3
    # Leases acquired together are renewed together: one pipeline per tick.
    assert max(batches) == 20
    assert sum(batches) / len(batches) > 10
    for h in helds:
        await h.release()


async def test_a_redis_that_may_evict_any_key_is_warned_about_at_start(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # allkeys-* eviction may drop a fence counter (no TTL): fences would repeat.
    for policy, warned in (("allkeys-lru", True), ("volatile-lru", False)):
        server = RedisServer("--maxmemory", "100mb", "--maxmemory-policy", policy).start()
        try:
            caplog.clear()
            dist = Dist(redis=server.url, postgres=None, namespace=namespace, sessions=False)
            async with dist:
                pass
            warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            evicting = [m for m in warnings if f"maxmemory-policy {policy}" in m]
            assert bool(evicting) is warned, warnings
            if warned:
                assert "fence counter" in evicting[0]
                assert "set maxmemory-policy noeviction" in evicting[0]
        finally:
            server.close()


async def test_held_locks_and_a_leadership_outlive_their_ttl_on_redis_cluster(
    make_dist, cluster_url: str
) -> None:
    """The watchdog's batched renewal must work across the cluster's shards."""
    dist: Dist = await make_dist(redis=cluster_url, postgres=None, sessions=False)
    helds = [await dist.lock(f"k{i}", ttl=1.2).acquire() for i in range(20)]
    election = dist.election("e", ttl=1.5, renew_deadline=1.0, retry=0.3)
    async with election.leadership() as term:
        await asyncio.sleep(2.5)  # several renewal periods past both ttls
        assert not term.lost.is_set()
        assert election.is_leader
    assert not [h.name for h in helds if h.lost.is_set()]
    with pytest.raises(LockTimeout):
        await dist.lock("k7").acquire(timeout=0)
    for h in helds:
        await h.release()
