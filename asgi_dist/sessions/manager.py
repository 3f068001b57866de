"""SessionManager: the session capability of one Dist."""

from __future__ import annotations

from asgi_dist.backends import Runtime
from asgi_dist.context import RequestHook
from asgi_dist.sessions.config import SessionConfig

__all__ = ["SessionManager"]


class SessionManager:
    def __init__(self, runtime: Runtime, config: SessionConfig, secret_keys: list[str]) -> None:
        self.runtime = runtime
        self.config = config
        self.secret_keys = secret_keys

    def register(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def request_hook(self) -> RequestHook | None:
        return None
