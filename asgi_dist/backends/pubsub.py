"""One Redis pub/sub connection per process, demultiplexed to many listeners.

Lock waiters, elections and session near caches all need "tell me when X
changes".  A connection per listener would exhaust Redis (and the client pool)
under contention, and polling costs a command per waiter per tick; so every
listener of one Dist shares one connection and one reader task, and a dict
routes each message to its callbacks.

Rules a listener can rely on:

* ``await hub.subscribe(channel, callback)`` returns only after Redis has
  acknowledged the ``SUBSCRIBE`` (or the channel was already subscribed), so a
  listener that subscribes *before* checking state cannot miss a change made
  after the check.
* Callbacks are plain functions run in the reader task: they must only record
  (set an event, drop a cache entry), never block.
* A callback receives ``None`` instead of a payload after the connection was
  re-established: messages may have been lost meanwhile, so re-check state.
* Reconnection uses capped exponential backoff with jitter; a PING heartbeat
  notices a silently dead connection.

On Redis Cluster classic ``PUBLISH`` is broadcast to every node, so one
connection to any node hears every channel.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection

from asgi_dist.backends.redis import RedisBackend
from asgi_dist.backends.resp import MultiplexedRedis, Subscriber
from asgi_dist.errors import ConfigError

__all__ = ["Listener", "PubSubHub", "Subscription"]

log = logging.getLogger("asgi_dist.pubsub")

# A message payload, or None after a reconnect ("you may have missed messages").
Listener = Callable[[bytes | None], None]

_OUTAGE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)


class _Link(Protocol):
    """The subscriber connection, one of the two below."""

    async def connect(self) -> None: ...

    async def send(self, *args: str) -> None: ...

    async def serve(self) -> None:
        """Hand every reply to the hub until the connection fails (raises)."""

    async def close(self) -> None: ...


class _RedisPyLink:
    """The subscriber connection through redis-py (TLS, Sentinel, Cluster, an app's
    own client): a reader coroutine hands each reply on."""

    def __init__(self, conn: AbstractConnection, handle: Callable[[Any], None]) -> None:
        self._conn = conn
        self._handle = handle

    async def connect(self) -> None:
        await self._conn.connect()  # type: ignore[no-untyped-call]

    async def send(self, *args: str) -> None:
        # check_health=False: a health-check PING would read our messages.
        await self._conn.send_command(*args, check_health=False)

    async def serve(self) -> None:
        while True:
            try:
                reply = await self._conn.read_response(timeout=math.inf, push_request=True)
            except redis_errors.ResponseError as exc:
                reply = exc  # an error reply, handed on like the other link's
            self._handle(reply)

    async def close(self) -> None:
        await self._conn.disconnect(nowait=True)


class _RespLink:
    """The subscriber connection of a plain ``redis://`` or ``unix://`` URL: each
    reply is handed on from the socket's read callback, so a message reaches its
    listener with no reader task to wake in between (one event-loop turn less)."""

    def __init__(
        self, multiplexed: MultiplexedRedis, name: str, handle: Callable[[Any], None]
    ) -> None:
        self._multiplexed = multiplexed
        self._name = name
        self._handle = handle
        self._subscriber: Subscriber | None = None

    async def connect(self) -> None:
        self._subscriber = await self._multiplexed.subscriber(self._handle, name=self._name)

    async def send(self, *args: str) -> None:
        assert self._subscriber is not None
        self._subscriber.send(*args)

    async def serve(self) -> None:
        assert self._subscriber is not None
        await self._subscriber.wait_closed()
        raise redis_errors.ConnectionError("the pub/sub connection was closed")

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()


class Subscription:
    """One listener on one channel; ``close()`` is synchronous so it works in ``finally``."""

    __slots__ = ("_closed", "_hub", "callback", "channel")

    def __init__(self, hub: PubSubHub, channel: str, callback: Listener) -> None:
        self._hub = hub
        self.channel = channel
        self.callback = callback
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub._remove(self)


class PubSubHub:
    """The shared pub/sub connection of one Dist (``runtime.pubsub``)."""

    def __init__(
        self,
        redis: RedisBackend,
        *,
        heartbeat: float = 5.0,
        max_backoff: float = 2.0,
        linger: float = 1.0,
    ) -> None:
        self._redis = redis
        self.client_name = f"asgi_dist:pubsub:{redis.namespace}"
        self._heartbeat = heartbeat
        self._max_backoff = max_backoff
        # A channel stays subscribed this long after its last listener left:
        # a busy lock's waiters come and go, and SUBSCRIBE/UNSUBSCRIBE churn
        # would add a round trip to every wait.
        self._linger = linger
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        self._listeners: dict[str, set[Subscription]] = {}
        # Channels this process wants subscribed (what a reconnect restores).
        self._wanted: set[str] = set()
        # SUBSCRIBE acknowledgements awaited, per channel, in send order.
        self._pending: dict[str, deque[asyncio.Future[None]]] = {}
        self._link: _Link | None = None
        # Per connection: channels still owed a None, and channels whose first
        # acknowledgement answers every SUBSCRIBE sent before (see _run).
        self._unsynced: set[str] = set()
        self._fresh: set[str] = set()
        # Commands sent on this connection and not yet answered, in order, each
        # as the replies that answer it ((kind, channel) pairs): an error reply,
        # which names no channel, answers the oldest.
        self._unanswered: deque[list[tuple[bytes, str]]] = deque()
        self._connected = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._runner: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._last_seen = 0.0
        self._closed = False
        self.reconnects = 0

    # public ----------------------------------------------------------------------

    @property
    def channels(self) -> frozenset[str]:
        """Channels with at least one listener (tests check nothing is left behind)."""
        return frozenset(self._listeners)

    async def subscribe(self, channel: str, callback: Listener) -> Subscription:
        """Register ``callback`` on ``channel``; returns once Redis has acknowledged."""
        if self._closed:
            raise RuntimeError("the pub/sub hub is closed (the Dist was stopped)")
        self._ensure_running()
        sub = Subscription(self, channel, callback)
        self._listeners.setdefault(channel, set()).add(sub)
        lingering = self._lingering.pop(channel, None)
        if lingering is not None:
            lingering.cancel()
        try:
            if channel not in self._wanted:
                self._wanted.add(channel)
                ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._pending.setdefault(channel, deque()).append(ack)
                await self._send("SUBSCRIBE", channel)
                await asyncio.shield(ack)
            else:
                queue = self._pending.get(channel)
                if queue:
                    await asyncio.shield(queue[-1])
        except BaseException:
            sub.close()
            raise
        return sub

    def listening(self, channel: str) -> bool:
        """Whether a message published on ``channel`` now reaches its listeners: the
        connection is up and the channel's subscription is acknowledged on it (after a
        reconnect, once its listeners had their ``None``).  A cache that invalidation
        messages keep current may serve only while this holds: between a dropped
        connection and the resync, messages are lost and nobody is told yet."""
        return (
            self._link is not None
            and channel in self._wanted
            and channel not in self._unsynced
            and not self._pending.get(channel)
        )

    def subscribe_now(self, channel: str, callback: Listener) -> Subscription | None:
        """:meth:`subscribe` without waiting, if ``channel`` is subscribed already
        (acknowledged, on a live connection, perhaps lingering); else None."""
        if self._closed or self._link is None or channel not in self._wanted:
            return None
        if self._pending.get(channel):
            return None  # its SUBSCRIBE is not acknowledged yet
        sub = Subscription(self, channel, callback)
        self._listeners.setdefault(channel, set()).add(sub)
        lingering = self._lingering.pop(channel, None)
        if lingering is not None:
            lingering.cancel()
        return sub

    async def publish(self, channel: str, message: bytes | str) -> int:
        """``PUBLISH`` through the regular client (not the subscriber connection)."""
        return int(await self._redis.client.publish(channel, message))

    async def close(self) -> None:
        self._closed = True
        for handle in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
        # Closing the socket first ends the reader's read even if a cancellation
        # were lost inside the client library; then cancel and wait, bounded.
        await self._drop_connection()
        runner, self._runner = self._runner, None
        tasks = [t for t in (runner, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for queue in self._pending.values():
            for fut in queue:
                if not fut.done():
                    fut.cancel()
        self._pending.clear()

    # internals -------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="asgi_dist:pubsub")

    def _remove(self, sub: Subscription) -> None:
        subs = self._listeners.get(sub.channel)
        if subs is None:
            return
        subs.discard(sub)
        if subs:
            return
        del self._listeners[sub.channel]
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._linger > 0 and sub.channel not in self._lingering:
            self._lingering[sub.channel] = loop.call_later(
                self._linger, self._drop_channel, sub.channel
            )
        else:
            self._drop_channel(sub.channel)

    def _drop_channel(self, channel: str) -> None:
        self._lingering.pop(channel, None)
        if channel in self._listeners or self._closed:
            return  # a listener came back
        self._wanted.discard(channel)
        if self._link is not None:
            task = asyncio.get_running_loop().create_task(self._unsubscribe(channel))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _unsubscribe(self, channel: str) -> None:
        if channel in self._wanted:
            return  # re-subscribed meanwhile
        try:
            await self._send("UNSUBSCRIBE", channel)
        except _OUTAGE:
            pass  # the reconnect restores only wanted channels

    async def _send(self, *args: str) -> None:
        """Send on the subscriber connection; while disconnected, the reconnect sends it."""
        async with self._send_lock:
            link = self._link
            if link is None:
                return
            self._expect(args)
            try:
                await link.send(*args)
            except _OUTAGE:
                await self._drop_connection()

    def _new_link(self) -> _Link:
        if self._redis.multiplexed is not None:
            return _RespLink(self._redis.multiplexed, self.client_name, self._on_reply)
        client = self._redis.client
        if isinstance(client, RedisCluster):
            node = client.get_default_node() or client.get_primaries()[0]
            kwargs = dict(node.connection_kwargs)
            conn: AbstractConnection = node.connection_class(**kwargs)
        else:
            assert isinstance(client, Redis)
            # The pool's factory keeps TLS, auth and Sentinel master discovery.
            conn = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        conn.health_check_interval = 0
        # Named, so operators (and tests) can see it is one per process.
        conn.client_name = self.client_name
        return _RedisPyLink(conn, self._on_reply)

    async def _drop_connection(self) -> None:
        link, self._link = self._link, None
        self._connected.clear()
        if link is not None:
            try:
                await link.close()
            except Exception:
                log.debug("error closing the pub/sub connection", exc_info=True)

    async def _run(self) -> None:
        backoff = 0.05
        loop = asyncio.get_running_loop()
        while not self._closed:
            link = self._new_link()
            try:
                await link.connect()
                async with self._send_lock:
                    self._link = link
                    self._last_seen = time.monotonic()
                    resubscribe = sorted(self._wanted)
                    # After a reconnect every restored channel gets None once:
                    # messages may have been published while nobody listened.
                    self._unsynced = set(self._wanted) if self.reconnects else set()
                    # The first acknowledgement on a new connection answers every
                    # SUBSCRIBE sent for that channel on the old one (never acknowledged).
                    self._fresh = set(self._wanted)
                    self._unanswered = deque()
                    # One command per channel: Redis refuses a SUBSCRIBE whole if
                    # the user may not use one of its channels (ACL).
                    for channel in resubscribe:
                        self._expect(("SUBSCRIBE", channel))
                        await link.send("SUBSCRIBE", channel)
                self._connected.set()
                if self.reconnects or resubscribe:
                    log.debug("pub/sub connected; restoring %d channels", len(resubscribe))
                backoff = 0.05
                heartbeat = loop.create_task(self._beat(link))
                try:
                    await link.serve()
                finally:
                    heartbeat.cancel()
            except asyncio.CancelledError:
                raise
            except (*_OUTAGE, redis_errors.RedisError) as exc:
                if not self._closed:
                    log.warning("pub/sub connection lost (%s); reconnecting", exc)
            finally:
                if self._link is link:
                    await self._drop_connection()
                else:
                    await link.close()
            if self._closed:
                return
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)

    async def _beat(self, link: _Link) -> None:
        """PING now and then; drop a connection that stopped answering."""
        while True:
            await asyncio.sleep(self._heartbeat)
            if time.monotonic() - self._last_seen > 2.5 * self._heartbeat:
                log.warning("pub/sub connection silent for %.1fs; reconnecting", self._heartbeat)
                await link.close()
                return
            async with self._send_lock:
                if self._link is not link:
                    return
                self._expect(("PING",))
                await link.send("PING")

    def _on_reply(self, response: Any) -> None:
        self._last_seen = time.monotonic()
        if isinstance(response, Exception):
            self._refused(response)
            return
        if not isinstance(response, list) or not response:
            return
        kind = response[0]
        if kind == b"message":
            self._dispatch(response[1].decode(), response[2])
            return
        self._answered(kind, response[1].decode() if kind != b"pong" else "")
        if kind == b"subscribe":
            channel = response[1].decode()
            queue = self._pending.get(channel)
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(None)
                if channel not in self._fresh:
                    break
            self._fresh.discard(channel)
            if queue is not None and not queue:
                del self._pending[channel]
            if channel in self._unsynced:
                self._unsynced.discard(channel)
                self._dispatch(channel, None)

    def _expect(self, args: tuple[str, ...]) -> None:
        kind = args[0].lower().encode()
        self._unanswered.append([(kind, channel) for channel in args[1:]] or [(b"pong", "")])

    def _answered(self, kind: bytes, channel: str) -> None:
        for command in self._unanswered:
            if (kind, channel) in command:
                command.remove((kind, channel))
                break
        while self._unanswered and not self._unanswered[0]:
            self._unanswered.popleft()

    def _refused(self, error: Exception) -> None:
        """An error reply answers the oldest unanswered command.  A refused SUBSCRIBE
        (ACL: NOPERM on a channel; the start-up check makes it rare) fails its
        subscribers rather than leave them waiting for an acknowledgement."""
        command = self._unanswered.popleft() if self._unanswered else []
        channels = [channel for kind, channel in command if kind == b"subscribe"]
        if not channels:
            log.error("Redis refused a pub/sub command: %s", error)
            return
        refused = ConfigError(
            f"Redis refused to subscribe to {', '.join(channels)} ({error}); "
            "the Redis user needs asgi_dist's pub/sub channels: ACL SETUSER <user> "
            "allchannels, or '&<namespace>*' and '&{<namespace>*'"
        )
        log.error("%s", refused)
        for channel in channels:
            self._wanted.discard(channel)
            for fut in self._pending.pop(channel, ()):
                if not fut.done():
                    fut.set_exception(refused)

    def _dispatch(self, channel: str, payload: bytes | None) -> None:
        for sub in list(self._listeners.get(channel, ())):
            try:
                sub.callback(payload)
            except Exception:
                log.exception("pub/sub listener on %s failed", channel)
