"""Drive the ASGI lifespan protocol by hand (httpx does not)."""

from __future__ import annotations

import asyncio
from typing import Any

from asgi_dist._types import ASGIApp, Message

__all__ = ["Lifespan"]


class Lifespan:
    """``async with Lifespan(app) as lifespan:`` sends startup; exit sends shutdown.

    ``lifespan.sent`` holds every message the app sent; ``lifespan.state`` the
    state dict the server shared with the app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self.sent: list[Message] = []
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        self.sent.append(message)
        await self._outbox.put(message)

    async def startup(self) -> Message:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        self._task = asyncio.create_task(self.app(scope, self._receive, self._send))
        await self._inbox.put({"type": "lifespan.startup"})
        return await asyncio.wait_for(self._outbox.get(), 15)

    async def shutdown(self) -> Message:
        await self._inbox.put({"type": "lifespan.shutdown"})
        message = await asyncio.wait_for(self._outbox.get(), 15)
        if self._task is not None:
            await asyncio.wait_for(asyncio.gather(self._task, return_exceptions=True), 15)
        return message

    async def __aenter__(self) -> Lifespan:
        message = await self.startup()
        assert message["type"] == "lifespan.startup.complete", message
        return self

    async def __aexit__(self, *exc: object) -> None:
        message = await self.shutdown()
        assert message["type"] == "lifespan.shutdown.complete", message
