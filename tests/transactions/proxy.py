"""A TCP proxy in the test's event loop: cut it to make a server unreachable for one Dist,
or black-hole it to make the server stop answering while every connection stays open.

The shared servers are never touched; only the connections through the proxy suffer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

__all__ = ["TcpProxy", "proxied"]


class _Link:
    """One proxied connection: both sockets, and whether it forwards anything."""

    def __init__(self, client: asyncio.StreamWriter, silent: bool) -> None:
        self.writers = {client}
        self.silent = silent
        self.ended = asyncio.Event()

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.ended.set()


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._black_hole = False

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, silent=self._black_hole)
        if self._server is None:  # accepted as the proxy was cut
            link.abort()
            return
        self._links.add(link)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            if link.silent:
                # Accepted (the kernel would have), never connected on: nothing flows.
                await link.ended.wait()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()
                return
            link.writers.add(up_writer)
            if link.ended.is_set():  # cut while connecting
                up_writer.transport.abort()
                return
            await asyncio.gather(
                self._pipe(reader, up_writer, link), self._pipe(up_reader, writer, link)
            )
        finally:
            self._links.discard(link)
            self._handlers.discard(handler)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link) -> None:
        with contextlib.suppress(Exception):
            while data := await src.read(65536):
                if link.silent:
                    # Swallow this and read no more (the sender's buffers fill up, as
                    # behind a dead route), and keep both sockets open: neither side
                    # ever learns that the other is gone.
                    await link.ended.wait()
                    return
                dst.write(data)
                await dst.drain()
        if not link.silent:
            dst.close()

    async def cut(self) -> None:
        """Stop listening and drop every proxied connection (the server looks down)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.abort()
        self._links.clear()
        if self._handlers:  # let them end before the test's event loop does
            await asyncio.wait(set(self._handlers), timeout=2.0)

    async def restore(self) -> None:
        """Listen again on the same port (the server is back)."""
        self._black_hole = False
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    def black_hole(self) -> None:
        """From now on forward nothing, and close nothing: on every open connection and on
        every new one, which is accepted and then ignored.  The server looks alive to TCP
        and never answers (packets silently dropped, a network partition, a frozen host)."""
        self._black_hole = True
        for link in self._links:
            link.silent = True

    def heal(self) -> None:
        """Forward new connections again.  The black-holed ones stay silent for good, as
        connections across a healed partition do once their peer gave up on them: a
        client that kept waiting on one would wait forever."""
        self._black_hole = False


@contextlib.asynccontextmanager
async def proxied(url: str, default_port: int) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy to the server of ``url`` (a DSN or a Redis URL), and ``url`` through it;
    every proxied connection is dropped at the end."""
    parts = urlsplit(url)
    proxy = await TcpProxy(parts.port or default_port, parts.hostname or "127.0.0.1").start()
    userinfo, at, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}{at}127.0.0.1:{proxy.port}"
    try:
        yield proxy, urlunsplit(parts._replace(netloc=netloc))
    finally:
        await proxy.cut()
