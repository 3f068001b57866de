"""The multiplexed connection of the hot paths: replies stay matched to their callers
through concurrency, cancellation, errors, restarts and pauses, on real servers."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from asgi_dist.backends.redis import RedisBackend, Script, create_multiplexed
from asgi_dist.backends.resp import MultiplexedRedis
from tests.helpers.servers import RedisServer


@pytest.fixture
async def mux(redis_url: str) -> AsyncIterator[MultiplexedRedis]:
    client = create_multiplexed(redis_url, connect_timeout=2.0)
    assert client is not None
    yield client
    await client.aclose()


async def test_a_thousand_concurrent_commands_each_get_their_own_reply(
    mux: MultiplexedRedis,
) -> None:
    values = [secrets.token_hex(8) for _ in range(1000)]
    replies = await asyncio.gather(*(mux.execute_command("ECHO", v) for v in values))
    assert replies == [v.encode() for v in values]


async def test_a_cancelled_caller_leaves_the_stream_in_step(
    mux: MultiplexedRedis, namespace: str
) -> None:
    key = f"{namespace}:list"
    # A command whose reply is still out when its caller goes away ...
    slow = asyncio.ensure_future(mux.execute_command("BLPOP", key, 0.2))
    await asyncio.sleep(0.05)
    slow.cancel()
    # ... does not shift the next caller's reply by one.
    assert await mux.execute_command("ECHO", "mine") == b"mine"
    assert await mux.execute_command("INCR", f"{namespace}:n") == 1


async def test_error_replies_raise_redis_py_errors_and_the_connection_stays_usable(
    mux: MultiplexedRedis, namespace: str
) -> None:
    with pytest.raises(redis_errors.NoScriptError):
        await mux.evalsha("0" * 40, 0)
    await mux.execute_command("RPUSH", f"{namespace}:s", "text")
    with pytest.raises(redis_errors.ResponseError, match="WRONGTYPE"):
        await mux.execute_command("INCR", f"{namespace}:s")
    assert await mux.eval("return ARGV[1]", 0, "ok") == b"ok"


async def test_password_and_database_come_from_the_url() -> None:
    server = RedisServer("--requirepass", "s3cret").start()
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        mux = create_multiplexed(url)
        assert mux is not None
        await mux.execute_command("SET", "k", "in-db-3")
        check = aioredis.Redis.from_url(url)
        assert await check.get("k") == b"in-db-3"
        await check.aclose()
        await mux.aclose()
        wrong = create_multiplexed(f"redis://:nope@127.0.0.1:{server.port}/0")
        assert wrong is not None
        with pytest.raises(redis_errors.AuthenticationError):
            await wrong.execute_command("PING")
        await wrong.aclose()
    finally:
        server.close()


async def test_a_killed_server_fails_the_waiting_commands_and_a_restart_reconnects() -> None:
    server = RedisServer().start()
    try:
        mux = create_multiplexed(server.url, connect_timeout=2.0)
        assert mux is not None
        assert await mux.execute_command("PING") == b"PONG"
        waiting = asyncio.ensure_future(mux.execute_command("BLPOP", "never", 5))
        await asyncio.sleep(0.05)
        server.kill()
        with pytest.raises(redis_errors.ConnectionError):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(redis_errors.ConnectionError):  # down: refused at once
            await asyncio.wait_for(mux.execute_command("PING"), 5)
        server.start()
        assert await asyncio.wait_for(mux.execute_command("PING"), 5) == b"PONG"
        await mux.aclose()
    finally:
        server.close()


async def test_a_paused_server_answers_in_order_once_resumed() -> None:
    server = RedisServer().start()
    try:
        mux = create_multiplexed(server.url, connect_timeout=2.0)
        assert mux is not None
        await mux.execute_command("PING")
        server.pause()
        timed_out = asyncio.ensure_future(mux.execute_command("ECHO", "first"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(timed_out, 0.2)  # a bounded caller gives up ...
        later = asyncio.ensure_future(mux.execute_command("ECHO", "second"))
        server.resume()
        assert await asyncio.wait_for(later, 5) == b"second"  # ... and nobody is shifted
        await mux.aclose()
    finally:
        server.close()


async def test_a_command_without_a_reply_past_dead_after_fails_and_the_connection_is_replaced() -> (
    None
):
    server = RedisServer().start()
    try:
        mux = create_multiplexed(server.url, connect_timeout=2.0)
        assert mux is not None
        mux.dead_after = 0.3
        await mux.execute_command("PING")
        # Frozen (SIGSTOP): its kernel still accepts and buffers, nothing answers.
        server.pause()
        stuck = asyncio.ensure_future(mux.execute_command("PING"))
        # No other command needed: the connection's own timer fails it.
        with pytest.raises(redis_errors.ConnectionError, match=r"no reply for 0\.3s"):
            await asyncio.wait_for(stuck, 5)
        fresh = asyncio.ensure_future(mux.execute_command("ECHO", "fresh"))
        with pytest.raises(redis_errors.ConnectionError, match=r"no reply for 0\.3s"):
            await asyncio.wait_for(fresh, 5)  # still frozen: bounded again
        server.resume()
        assert await asyncio.wait_for(mux.execute_command("ECHO", "back"), 5) == b"back"
        await mux.aclose()
    finally:
        server.close()


async def test_replies_that_keep_coming_keep_a_busy_connection() -> None:
    server = RedisServer().start()
    try:
        mux = create_multiplexed(server.url, connect_timeout=2.0)
        assert mux is not None
        mux.dead_after = 0.2
        # Commands wait back to back for a second, five times dead_after: each is
        # answered at once, so the connection is never taken for dead.
        protocol = None
        for _ in range(200):
            replies = await asyncio.gather(*(mux.execute_command("PING") for _ in range(20)))
            assert replies == [b"PONG"] * 20
            protocol = protocol or mux._protocol
            await asyncio.sleep(0.005)
        assert mux._protocol is protocol and not protocol.closed  # type: ignore[union-attr]
        await mux.aclose()
    finally:
        server.close()


def test_only_plain_urls_are_multiplexed() -> None:
    assert create_multiplexed("redis://127.0.0.1:6379/0") is not None
    assert create_multiplexed("unix:///tmp/redis.sock?db=1") is not None
    assert create_multiplexed("rediss://127.0.0.1:6379/0") is None
    assert create_multiplexed("redis+sentinel://127.0.0.1:26379/mymaster") is None
    assert create_multiplexed("redis://127.0.0.1:6379/0?socket_timeout=3") is None
    given = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    backend = RedisBackend(given, namespace="ns")
    assert backend.multiplexed is None and backend.commands is given  # the app's own client


async def test_a_callback_gets_its_reply_in_order_with_futures_around_it(
    mux: MultiplexedRedis,
) -> None:
    seen: list[tuple[object, object]] = []
    first = mux.execute_command("ECHO", "a")
    mux.execute_command_to(lambda reply, error: seen.append((reply, error)), "ECHO", "b")
    third = mux.execute_command("ECHO", "c")
    assert (await first, await third) == (b"a", b"c")
    assert seen == [(b"b", None)]  # run by the reader, before the third reply was handed on


async def test_a_script_sent_with_a_callback_falls_back_to_eval_once() -> None:
    server = RedisServer().start()  # private: its script cache is flushed below
    backend = RedisBackend(server.url, namespace="t")
    await backend.start()
    try:
        assert backend.multiplexed is not None
        script = Script("asgi_dist.locks", "leave")
        await backend.client.script_flush()  # the next EVALSHA answers NOSCRIPT
        done: asyncio.Future[tuple[object, object]] = asyncio.get_running_loop().create_future()
        lease = backend.key("lock", "x", "lease")
        keys = [lease, backend.key("lock", "x", "fence"), backend.key("lock", "x", "waiters")]
        script.send(backend.multiplexed, keys, ["me", "chan"], lambda r, e: done.set_result((r, e)))
        assert await done == (0, None)
    finally:
        await backend.stop()
        server.close()


async def test_a_script_sent_through_redis_py_completes_for_a_caller_that_left() -> None:
    # Without the multiplexed connection (an app's own client, TLS, Cluster) a
    # task makes the call; the callback runs although its sender was cancelled.
    server = RedisServer().start()
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.hset("{t}:lease", mapping={"token": "me", "fence": 1})
        done: asyncio.Future[tuple[object, object]] = asyncio.get_running_loop().create_future()
        release = Script("asgi_dist.locks", "release")

        async def sender() -> None:
            release.send(
                client,
                ["{t}:lease", "{t}:fence"],
                ["me", "{t}:wake"],
                lambda r, e: done.set_result((r, e)),
            )
            await asyncio.sleep(3600)

        task = asyncio.create_task(sender())
        await asyncio.sleep(0)
        task.cancel()
        assert await asyncio.wait_for(done, 5) == (1, None)
        assert await client.exists("{t}:lease") == 0
    finally:
        await client.aclose()
        server.close()


async def test_a_callback_hears_of_a_killed_server() -> None:
    server = RedisServer().start()
    try:
        mux = create_multiplexed(server.url, connect_timeout=2.0)
        assert mux is not None
        await mux.execute_command("PING")
        heard: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        mux.execute_command_to(lambda reply, error: heard.set_result(error), "BLPOP", "k", 5)
        await asyncio.sleep(0.05)
        server.kill()
        assert isinstance(await asyncio.wait_for(heard, 5), redis_errors.ConnectionError)
        await mux.aclose()
    finally:
        server.close()
