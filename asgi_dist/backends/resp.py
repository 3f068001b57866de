"""One multiplexed RESP connection per process for the per-request commands.

Why not redis-py here: its asyncio client checks a connection out of a pool,
probes it for stray data, and returns it, for every command; on this 2-core
machine that costs ~100 µs of CPU per command, more than the Redis round trip
itself, and it is what bounds a session- or lock-heavy app.  Redis answers the
commands of one connection in order, so any number of concurrent callers can
share one connection: each command is written (coalesced with the others sent
in the same event-loop turn) and its reply matched to the oldest waiting
future.  A cancelled caller costs nothing: its reply is read and dropped, and
the stream stays in step, so a timeout never forces a reconnect.

Only non-blocking commands belong here (scripts, plain reads and writes): a
blocking command would stall every caller behind it.  Everything else — pub/sub,
blocking stream reads, Sentinel, Cluster and user-supplied clients — stays on
redis-py.  Parsing and packing use hiredis, redis-py's own C extension.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors

__all__ = ["MultiplexedRedis", "ReplyCallback", "Subscriber"]

log = logging.getLogger("asgi_dist.redis")

# Called with (reply, None) or (None, error) from the reader itself: no future,
# no extra event-loop turn between the reply and what it sets in motion.
ReplyCallback = Callable[[Any, BaseException | None], None]

# Redis error prefixes that redis-py turns into specific exceptions; callers
# catch those (NOSCRIPT falls back to EVAL, the others are outages).
_ERRORS: dict[str, type[redis_errors.RedisError]] = {
    "NOSCRIPT": redis_errors.NoScriptError,
    "LOADING": redis_errors.BusyLoadingError,
    "READONLY": redis_errors.ReadOnlyError,
    "NOAUTH": redis_errors.AuthenticationError,
    "WRONGPASS": redis_errors.AuthenticationError,
    "TRYAGAIN": redis_errors.TryAgainError,
}


def _reply_error(error: hiredis.ReplyError) -> redis_errors.RedisError:
    message = str(error)
    code = message.split(" ", 1)[0]
    return _ERRORS.get(code, redis_errors.ResponseError)(message)


class _Protocol(asyncio.Protocol):
    """The connection: writes commands, matches replies to waiting futures in order.

    With ``push`` set it is a subscriber connection: once the set-up commands are
    answered, every reply (subscribe acknowledgements, messages) goes to ``push``
    straight from the socket read.
    """

    def __init__(self, where: str, push: Callable[[Any], None] | None = None) -> None:
        self.where = where
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any] | ReplyCallback] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.push = push
        # Resolved when the connection ends (a subscriber's reader awaits it).
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.last_reply = time.monotonic()
        self._out: list[bytes] = []
        # Commands unanswered this long fail (and the connection is dropped): a
        # frozen or vanished server costs a reconnect, never a hang.  One timer at
        # a time, armed when commands start waiting, re-armed while they still do.
        self.dead_after: float | None = None
        self._stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not subclasses
        # of asyncio.Transport, though they have its methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            # A peer that vanished without a FIN is found by keepalive, not never.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.send_to(command, future)
        return future

    def send_to(self, command: bytes, receiver: asyncio.Future[Any] | ReplyCallback) -> None:
        """Send ``command``; its reply goes to ``receiver`` (a future or a callback)."""
        if self.closed:
            _deliver(receiver, None, self._lost())
            return
        if not self.waiting:
            # An idle connection: write at once, the round trip is all there is.
            self.last_reply = time.monotonic()  # nothing was overdue until now
            self.waiting.append(receiver)
            assert self.transport is not None
            self.transport.write(command)
            if self._stall is None and self.dead_after is not None:
                self._stall = self.loop.call_later(self.dead_after, self._check_stall)
            return
        self.waiting.append(receiver)
        if not self._out:
            # Under load, the commands of one loop turn leave in one write (and Redis
            # answers them in one), which is most of the saving.
            self.loop.call_soon(self._flush)
        self._out.append(command)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(f"protocol error: {exc}")
                return
            if reply is False:
                break
            self.last_reply = time.monotonic()
            if not waiting and self.push is not None:
                self.push(reply)
                continue
            if not waiting:  # cannot happen with a well-behaved server
                self.abort("a reply came that no command asked for")
                return
            receiver = waiting.popleft()
            if isinstance(reply, hiredis.ReplyError):
                _deliver(receiver, None, _reply_error(reply))
            else:
                _deliver(receiver, reply, None)

    def _check_stall(self) -> None:
        self._stall = None
        if self.closed or not self.waiting or self.dead_after is None:
            return
        silent = time.monotonic() - self.last_reply
        if silent >= self.dead_after:
            self.abort(f"no reply for {self.dead_after:g}s (server frozen or gone?)")
        else:
            self._stall = self.loop.call_later(self.dead_after - silent, self._check_stall)

    def _lost(self, why: str = "connection closed") -> redis_errors.ConnectionError:
        return redis_errors.ConnectionError(f"Redis at {self.where}: {why}")

    def abort(self, why: str) -> None:
        self._fail(self._lost(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(self._lost(f"connection lost ({exc})" if exc else "connection closed"))

    def _fail(self, error: redis_errors.ConnectionError) -> None:
        self.closed = True
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if not self.lost.done():
            self.lost.set_exception(error)
            self.lost.exception()  # retrieved: nobody need be awaiting it
        while self.waiting:
            _deliver(self.waiting.popleft(), None, error)


def _deliver(
    receiver: asyncio.Future[Any] | ReplyCallback, reply: Any, error: BaseException | None
) -> None:
    if isinstance(receiver, asyncio.Future):
        if receiver.done():
            return  # the caller was cancelled; its reply is dropped
        if error is not None:
            receiver.set_exception(error)
        else:
            receiver.set_result(reply)
        return
    try:
        receiver(reply, error)
    except Exception:  # a callback's bug must not stop the reader
        log.exception("a Redis reply callback failed")


class Subscriber:
    """A subscriber connection (see :meth:`MultiplexedRedis.subscriber`)."""

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol

    def send(self, *args: Any) -> None:
        """Write a command (SUBSCRIBE, UNSUBSCRIBE, PING); its reply goes to ``push``."""
        protocol = self._protocol
        if protocol.closed or protocol.transport is None:
            raise protocol._lost()
        protocol.transport.write(hiredis.pack_command(args))

    async def wait_closed(self) -> None:
        """Return, or raise the connection error, when the connection ends."""
        await asyncio.shield(self._protocol.lost)

    def close(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.abort()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class MultiplexedRedis:
    """The commands of every task of a process over one connection (see the module).

    ``connection`` holds what :func:`redis.asyncio.connection.parse_url` gives
    for a ``redis://`` or ``unix://`` URL.  Commands that wait longer than
    ``dead_after`` without any reply on their connection fail with a
    ``ConnectionError`` and the connection is dropped, so a frozen or vanished
    server costs a reconnect, not a hang (the kernel of a frozen server still
    accepts connections, so only a timer can tell).
    """

    def __init__(
        self,
        connection: dict[str, Any],
        *,
        where: str,
        connect_timeout: float = 5.0,
        dead_after: float = 10.0,
    ) -> None:
        self.where = where
        self.connect_timeout = connect_timeout
        self.dead_after = dead_after
        self._host = connection.get("host", "127.0.0.1")
        self._port = int(connection.get("port", 6379))
        self._path: str | None = connection.get("path")
        self._setup: list[tuple[Any, ...]] = []
        password = connection.get("password")
        if password is not None:
            username = connection.get("username")
            self._setup.append(("AUTH", username, password) if username else ("AUTH", password))
        if int(connection.get("db", 0)):
            self._setup.append(("SELECT", int(connection["db"])))
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        # Commands written, for benchmarks and tests that count round trips.
        self.commands_sent = 0

    def execute_command(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command; await the result for its reply (errors raised as redis-py's)."""
        command = self._pack(args)
        protocol = self._live_protocol()
        if protocol is not None:
            return protocol.send(command)
        return asyncio.ensure_future(self._send_when_connected(command))

    def execute_command_to(self, callback: ReplyCallback, *args: Any) -> None:
        """Send one command; ``callback(reply, error)`` runs when its reply is read
        (a connection is made first if needed).  Nothing can cancel it."""
        command = self._pack(args)
        protocol = self._live_protocol()
        if protocol is not None:
            protocol.send_to(command, callback)
            return
        connecting = asyncio.ensure_future(self._connected())

        def connected(done: asyncio.Future[_Protocol]) -> None:
            if done.cancelled():
                callback(None, redis_errors.ConnectionError(f"Redis at {self.where}: closed"))
            elif (exc := done.exception()) is not None:
                callback(None, exc)
            else:
                done.result().send_to(command, callback)

        connecting.add_done_callback(connected)

    def _pack(self, args: tuple[Any, ...]) -> bytes:
        self.commands_sent += 1
        packed: bytes = hiredis.pack_command(args)
        return packed

    def _live_protocol(self) -> _Protocol | None:
        """The open connection, if any (a stalled one closes itself)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return None
        return protocol

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> asyncio.Future[Any]:
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> asyncio.Future[Any]:
        return self.execute_command("EVAL", script, numkeys, *keys_and_args)

    async def _send_when_connected(self, command: bytes) -> Any:
        protocol = await self._connected()
        return await protocol.send(command)

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None or self._connecting.done():
            # One attempt shared by every caller that found the connection down.
            self._connecting = asyncio.ensure_future(self._connect())
            # Retrieved here too, so an attempt whose callers all left logs nothing.
            self._connecting.add_done_callback(_retrieve)
        # Shielded: a cancelled caller must not cancel the others' attempt.
        return await asyncio.shield(self._connecting)

    async def subscriber(self, push: Callable[[Any], None], *, name: str) -> Subscriber:
        """A new connection of its own for pub/sub, named ``name`` (CLIENT SETNAME):
        every reply read on it goes to ``push``, in the socket's read callback."""
        return Subscriber(await self._connect(push, ("CLIENT", "SETNAME", name)))

    async def _connect(
        self, push: Callable[[Any], None] | None = None, *setup: tuple[Any, ...]
    ) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                # The set-up commands are bounded by connect_timeout; after them, a
                # command connection bounds its commands by dead_after.
                def made() -> _Protocol:
                    return _Protocol(self.where, push)

                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(made, self._path)
                else:
                    _, protocol = await loop.create_connection(made, self._host, self._port)
                for command in (*self._setup, *setup):
                    await protocol.send(hiredis.pack_command(command))
        except BaseException as exc:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()  # e.g. AUTH refused: no half-set-up connection
            if isinstance(exc, (OSError, TimeoutError)):
                raise redis_errors.ConnectionError(
                    f"cannot connect to Redis at {self.where} ({type(exc).__name__}: {exc})"
                ) from exc
            raise
        if push is None:
            protocol.dead_after = self.dead_after
            self._protocol = protocol
        return protocol

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            protocol._fail(protocol._lost("client closed"))
