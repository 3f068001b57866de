"""Dist: configuration validated where it enters, bounded start, start/stop lifecycle."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit, urlunsplit

import pytest
from starlette.applications import Starlette

from asgi_dist import BackendUnavailable, ConfigError, Dist
from tests.helpers.servers import RedisServer, free_port

KEYS = ["a-test-secret-key-of-32-chars-xx"]


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"namespace": "Shop-1"}, "namespace='Shop-1'"),
        ({"namespace": ""}, "namespace=''"),
        ({"leader_ttl": 0}, "leader_ttl=0"),
        ({"connect_timeout": -1}, "connect_timeout=-1"),
        ({"secret_keys": ["short"]}, "too short"),
        ({"secret_keys": []}, "secret_keys"),
        ({"redis": "http://127.0.0.1:6379"}, "unsupported Redis URL scheme 'http'"),
        ({"redis": "redis+sentinel://127.0.0.1:26379"}, "names no service"),
        ({"postgres": 42}, "postgres=42"),
        ({"redis": 123}, "redis=123 is invalid: pass a URL"),
        ({"redis": "not a url"}, "scheme '' in 'not a url'"),
        ({"redis": "redis://127.0.0.1:notaport"}, "redis://127.0.0.1:notaport is invalid"),
        ({"redis": "redis://127.0.0.1:6379/x"}, "database 'x' is not a number"),
        ({"secret_keys": 123}, "secret_keys=123"),
        ({"sessions": True}, "sessions=True"),
        ({"sessions": {}}, "sessions={}"),
        ({"scheduler": "on"}, "scheduler='on'"),
        ({"leader_ttl": True}, "leader_ttl=True"),
        ({"leader_ttl": float("nan")}, "leader_ttl=nan"),
        ({"connect_timeout": float("nan")}, "connect_timeout=nan"),
        ({"connect_timeout": float("inf")}, "connect_timeout=inf"),
        ({"zookeeper": "::::"}, "zookeeper='::::'"),
        ({"postgres": "mysql://u:pw@db/x"}, "is not a PostgreSQL URL"),
        ({"postgres": "nonsense"}, "is not a PostgreSQL URL"),
        ({"postgres": "postgresql://db:port/x"}, "port that is not a number"),
        ({"node_id": 5}, "node_id=5 is invalid"),
        ({"node_id": ""}, "node_id='' is invalid"),
    ],
)
def test_bad_configuration_is_refused_with_the_value_and_the_fix(
    kwargs: dict[str, object], names: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Dist(**kwargs)  # type: ignore[arg-type]
    assert names in str(info.value)


def test_a_leader_ttl_from_the_environment_that_is_not_a_number_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASGI_DIST_LEADER_TTL", "x")
    with pytest.raises(ConfigError, match="ASGI_DIST_LEADER_TTL='x' is not a number"):
        Dist.from_env()


def test_serving_sessions_from_redis_without_keys_is_refused() -> None:
    dist = Dist(redis="redis://127.0.0.1:6379")  # fine for a worker that only locks
    with pytest.raises(ConfigError, match="secret_keys is required"):
        dist.wrap(Starlette())


def test_from_env_reads_the_documented_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASGI_DIST_REDIS_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("ASGI_DIST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1/test")
    monkeypatch.setenv("ASGI_DIST_NAMESPACE", "shop")
    monkeypatch.setenv("ASGI_DIST_SECRET_KEYS", f"{KEYS[0]},older-key-of-at-least-16")
    dist = Dist.from_env()
    assert dist.namespace == "shop"
    assert dist.runtime.redis is not None and dist.runtime.redis.where == "redis://127.0.0.1:6379"
    assert dist.runtime.postgres is not None
    assert dist.runtime.postgres.where == "127.0.0.1:5432/test"
    assert dist.runtime.default_backend == "redis"


def test_from_env_without_variables_is_the_embedded_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("ASGI_DIST_"):
            monkeypatch.delenv(name)
    dist = Dist.from_env()
    assert dist.runtime.redis is None and dist.runtime.postgres is None
    assert dist.runtime.default_backend == "memory"


def test_node_id_names_host_and_pid() -> None:
    node_id = Dist().node_id
    host, pid, rand = node_id.split(":")
    assert int(pid) == os.getpid() and host and len(rand) == 8
    assert Dist(node_id="web-1").node_id == "web-1"


async def test_start_against_a_dead_redis_port_fails_fast_naming_host_port_not_password() -> None:
    port = free_port()
    dist = Dist(redis=f"redis://:hunter2@127.0.0.1:{port}/0", secret_keys=KEYS)
    with pytest.raises(BackendUnavailable) as info:
        # The bound guards against a hang; the contract is "within 5 s".
        await asyncio.wait_for(dist.start(), 6)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert not dist.started


@pytest.mark.parametrize(
    ("server", "change", "named"),
    [
        ("redis", {"path": "/99"}, "database number"),  # the test server has the default 16
        ("redis", {"netloc": ":wrong-password@{host}"}, "password"),  # and no password
        ("postgres", {"path": "/no_such_database_here"}, "no_such_database_here"),
        ("postgres", {"netloc": "no_such_role@{host}"}, "no_such_role"),
    ],
)
async def test_a_server_that_refuses_the_credentials_or_database_is_a_config_error(
    redis_url: str, postgres_dsn: str, server: str, change: dict[str, str], named: str
) -> None:
    parts = urlsplit(redis_url if server == "redis" else postgres_dsn)
    host = parts.netloc.rpartition("@")[2]
    url = urlunsplit(parts._replace(**{k: v.format(host=host) for k, v in change.items()}))
    dist = Dist(secret_keys=KEYS, **{server: url})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="refused the connection") as info:
        await asyncio.wait_for(dist.start(), 6)
    assert named in str(info.value)
    assert "wrong-password" not in str(info.value)
    assert not dist.started


async def test_start_against_a_dead_postgres_port_fails_fast() -> None:
    port = free_port()
    dist = Dist(postgres=f"postgresql://postgres:hunter2@127.0.0.1:{port}/test", secret_keys=KEYS)
    with pytest.raises(BackendUnavailable) as info:
        await asyncio.wait_for(dist.start(), 6)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_start_against_a_frozen_redis_times_out_instead_of_hanging(
    redis_server: RedisServer,
) -> None:
    redis_server.pause()  # accepts TCP connections, never answers
    try:
        dist = Dist(redis=redis_server.url, secret_keys=KEYS, connect_timeout=1.0)
        with pytest.raises(BackendUnavailable, match="did not answer within 1s"):
            await asyncio.wait_for(dist.start(), 6)
    finally:
        redis_server.resume()


async def test_start_and_stop_are_idempotent_and_async_with_works(make_dist) -> None:  # type: ignore[no-untyped-def]
    dist: Dist = await make_dist(start=False)
    async with dist:
        await dist.start()
        assert dist.started and dist.start_count == 1
    assert not dist.started
    await dist.stop()
