"""ZooKeeper: the kazoo sessions of one Dist, for the ZooKeeper lock backend.

``Dist(zookeeper="host:port[,host:port][/chroot]")`` or ``ASGI_DIST_ZOOKEEPER_HOSTS``.
Every znode of a Dist lives under ``/asgi_dist/<namespace>``.

kazoo runs each session on its own threads.  :class:`ZooKeeperSession` brings
its replies and connection-state changes onto the event loop (through
``loop.call_soon_threadsafe``), so nothing here blocks the loop.

ZooKeeper's lease is the *session*: an ephemeral znode lives until its session
ends (closed, or expired ``timeout`` seconds after the server last heard from
the client).  Locks therefore get a session whose timeout is their ``ttl``:
:meth:`ZooKeeperBackend.session` opens one per distinct ttl, on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

from asgi_dist.errors import BackendUnavailable, ConfigError

__all__ = ["Request", "ZooKeeperBackend", "ZooKeeperSession", "is_outage"]

log = logging.getLogger("asgi_dist.zookeeper")

# One kazoo call: (operation, positional args, keyword args), e.g. ("get", (path,), {}).
Request = tuple[str, tuple[Any, ...], dict[str, Any]]

# Each session costs a TCP connection and three kazoo threads per process.
MAX_SESSIONS = 8

_OUTAGES: tuple[type[BaseException], ...] | None = None


def is_outage(exc: BaseException) -> bool:
    """Whether a kazoo exception means "ZooKeeper is unreachable right now"."""
    global _OUTAGES
    if _OUTAGES is None:
        from kazoo import exceptions as kz

        _OUTAGES = (
            kz.ConnectionLoss,
            kz.SessionExpiredError,
            kz.ConnectionClosedError,
            kz.OperationTimeoutError,
            kz.SessionMovedError,
        )
    return isinstance(exc, _OUTAGES)


class ZooKeeperSession:
    """One ZooKeeper session (one kazoo client) and its timeout in seconds.

    ``on_state(listener)`` calls ``listener("CONNECTED" | "SUSPENDED" | "LOST")``
    on the event loop when kazoo reports a change.  SUSPENDED means the
    connection dropped and the session may still be alive; LOST means the
    server expired it (kazoo then opens a new session by itself).
    """

    def __init__(self, client: Any, timeout: float, where: str) -> None:
        self.client = client
        self.timeout = timeout
        self.where = where
        self._loop = asyncio.get_running_loop()
        self._listeners: list[Callable[[str], None]] = []
        client.add_listener(self._from_kazoo)

    def __repr__(self) -> str:
        return f"<ZooKeeperSession {self.where} timeout={self.timeout:g}s id={self.session_id}>"

    @property
    def session_id(self) -> int | None:
        """The server's id of the live session, None while disconnected."""
        client_id = self.client.client_id
        return None if client_id is None else int(client_id[0])

    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    def on_state(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def _from_kazoo(self, state: Any) -> None:
        # kazoo's connection thread: it must not block, so hop to the loop.
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._changed, str(state))

    def _changed(self, state: str) -> None:
        log.info("ZooKeeper session at %s (timeout %gs): %s", self.where, self.timeout, state)
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                log.exception("ZooKeeper state listener failed")

    def unavailable(self, what: str, exc: BaseException | None = None) -> BackendUnavailable:
        cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        return BackendUnavailable(
            f"ZooKeeper at {self.where} is unavailable: {what}{cause}; retry shortly",
            retry_after=max(1.0, self.timeout),
        )

    async def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<op>_async(*args, **kwargs)`` awaited on the loop.

        Fails fast with :class:`BackendUnavailable` while disconnected (kazoo
        would queue the request until it reconnects) and waits at most the
        session timeout for a reply.  A caller that stops waiting does not
        stop the request: it still reaches the server.
        """
        [result] = await self.pipeline((op, args, kwargs))
        if isinstance(result, BaseException):
            raise result
        return result

    async def pipeline(self, *requests: Request) -> list[Any]:
        """Send ``(op, args, kwargs)`` requests back to back; one reply (or exception) each.

        ZooKeeper applies the requests of one session in the order they were
        sent, reads included, so a pipeline costs one round trip and each
        reply sees the effects of the requests before it.
        """
        replies: list[asyncio.Future[Any]] = []
        failed: BaseException | None = None
        for op, args, kwargs in requests:
            if failed is None:
                try:
                    replies.append(self._send(op, *args, **kwargs))
                    continue
                except BaseException as exc:
                    failed = exc
            lost: asyncio.Future[Any] = self._loop.create_future()
            lost.set_exception(failed)
            replies.append(lost)
        ops = ", ".join(op for op, _, _ in requests)
        try:
            async with asyncio.timeout(self.timeout):
                results = await asyncio.gather(*replies, return_exceptions=True)
        except TimeoutError as exc:
            raise self.unavailable(f"no reply to {ops} within {self.timeout:g}s") from exc
        for i, ((op, _, _), result) in enumerate(zip(requests, results, strict=True)):
            if isinstance(result, Exception) and is_outage(result):
                results[i] = self.unavailable(op, result)
                results[i].__cause__ = result
        return results

    def _send(self, op: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        if not self.client.connected:
            raise self.unavailable(f"{op} while disconnected")
        loop = self._loop
        reply: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any) -> None:
            if reply.done():
                return  # the caller gave up waiting
            if result.exception is None:
                reply.set_result(result.value)
            else:
                reply.set_exception(result.exception)

        def on_done(result: Any) -> None:  # kazoo's thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result)

        start = getattr(self, f"_{op}_async", None) or getattr(self.client, f"{op}_async")
        start(*args, **kwargs).rawlink(on_done)
        return reply

    def _create_container_async(self, path: str) -> Any:
        """Create a *container* znode (ZooKeeper 3.5+): the server deletes it
        once its last child is gone, so idle lock names leave nothing behind.

        kazoo has no API for it; its Create2 request under the createContainer
        opcode is exactly the wire format (ZooKeeper answers with a Create2 reply).
        """
        from kazoo.protocol.serialization import Create2
        from kazoo.security import OPEN_ACL_UNSAFE

        class CreateContainer(Create2):  # type: ignore[misc]
            type = 19  # OpCode.createContainer

        result = self.client.handler.async_result()
        chroot = self.client.chroot or ""
        # flags=4: CreateMode.CONTAINER
        self.client._call(CreateContainer(chroot + path, b"", OPEN_ACL_UNSAFE, 4), result)
        return result

    async def close(self) -> None:
        # stop() ends the session at once: the server deletes its ephemeral
        # znodes now instead of after the timeout.
        await asyncio.to_thread(self.client.stop)
        await asyncio.to_thread(self.client.close)


# host[:port] (a name, an IPv4 address or a bracketed IPv6 one), comma-separated,
# then an optional chroot path: what kazoo accepts.
_HOST = r"(?:[\w.-]+|\[[0-9a-fA-F:.]+\])(?::\d+)?"
_HOSTS = re.compile(rf"{_HOST}(?:,{_HOST})*(?:/\S*)?")


class ZooKeeperBackend:
    """The ZooKeeper sessions of one Dist."""

    def __init__(self, hosts: str, *, namespace: str, connect_timeout: float = 5.0) -> None:
        if not isinstance(hosts, str) or not _HOSTS.fullmatch(hosts.strip()):
            raise ConfigError(
                f"zookeeper={hosts!r} is invalid: use 'host:port[,host:port][/chroot]'"
            )
        self.hosts = hosts
        self.where = hosts.rpartition("@")[2]
        self.namespace = namespace
        self.root = f"/asgi_dist/{namespace}"
        self.connect_timeout = connect_timeout
        # The session opened at start: it proves the server answers, creates
        # the root, and serves reads (``holder()``).
        self.default: ZooKeeperSession | None = None
        self._sessions: dict[int, ZooKeeperSession] = {}
        self._opening: asyncio.Lock | None = None

    @property
    def client(self) -> Any:
        """The kazoo client of the default session (None before start)."""
        return None if self.default is None else self.default.client

    async def start(self) -> None:
        self._opening = asyncio.Lock()
        session = await self._open(max(self.connect_timeout, 2.0))
        try:
            await session.call("ensure_path", self.root)
        except BaseException:
            await session.close()
            raise
        self.default = session

    async def session(self, session_timeout: float) -> ZooKeeperSession:
        """The session whose timeout is ``session_timeout`` seconds (opened on first use).

        The server clamps a requested timeout to its ``minSessionTimeout`` ..
        ``maxSessionTimeout`` (by default 2 to 20 ticks: 4 to 40 s).
        """
        ms = max(1, round(session_timeout * 1000))
        found = self._sessions.get(ms)
        if found is not None:
            return found
        if self.default is None or self._opening is None:
            raise BackendUnavailable(
                f"ZooKeeper at {self.where} is not connected: start the Dist first "
                "(async with dist, or the ASGI lifespan)"
            )
        async with self._opening:
            found = self._sessions.get(ms)
            if found is not None:
                return found
            if len(self._sessions) >= MAX_SESSIONS:
                raise ConfigError(
                    f"ZooKeeper locks use one session per distinct ttl and {MAX_SESSIONS} are "
                    f"open already ({sorted(s / 1000 for s in self._sessions)}); "
                    f"ttl={session_timeout:g} would open another: use fewer distinct ttl values"
                )
            found = self._sessions[ms] = await self._open(ms / 1000)
        return found

    async def _open(self, session_timeout: float) -> ZooKeeperSession:
        try:
            from kazoo.client import KazooClient
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "the ZooKeeper backend needs kazoo: pip install 'asgi-dist[zookeeper]'"
            ) from exc
        client = KazooClient(
            hosts=self.hosts,
            timeout=session_timeout,
            # kazoo's default reconnect backoff grows to an hour; a session only
            # survives an outage if we are back within its timeout.
            connection_retry={
                "max_tries": -1,
                "delay": 0.05,
                "backoff": 2,
                "max_delay": max(0.2, min(2.0, session_timeout / 4)),
            },
        )
        try:
            await asyncio.to_thread(client.start, self.connect_timeout)
        except Exception as exc:
            await asyncio.to_thread(client.close)
            raise BackendUnavailable(
                f"ZooKeeper at {self.where} did not answer within {self.connect_timeout:g}s "
                f"({type(exc).__name__}: {exc}); start it or fix Dist(zookeeper=...) / "
                "ASGI_DIST_ZOOKEEPER_HOSTS"
            ) from exc
        return ZooKeeperSession(client, session_timeout, self.where)

    async def stop(self) -> None:
        sessions = list(self._sessions.values())
        if self.default is not None:
            sessions.append(self.default)
        self._sessions.clear()
        self.default = None
        for session in sessions:
            try:
                await session.close()
            except Exception:
                log.warning("closing a ZooKeeper session failed", exc_info=True)
