"""LockService: the lock capability of one Dist."""

from __future__ import annotations

from typing import Any

from asgi_dist.backends import Runtime
from asgi_dist.context import RequestHook

__all__ = ["LockService"]


class LockService:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def register(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def request_hook(self) -> RequestHook | None:
        return None

    def lock(self, name: str, **options: Any) -> Any:
        raise NotImplementedError("locks land with issue 4")

    def rwlock(self, name: str, **options: Any) -> Any:
        raise NotImplementedError("locks land with issue 4")

    def semaphore(self, name: str, limit: int, **options: Any) -> Any:
        raise NotImplementedError("locks land with issue 4")

    def election(self, name: str, **options: Any) -> Any:
        raise NotImplementedError("locks land with issue 4")

    def locked(self, name: str, **options: Any) -> Any:
        raise NotImplementedError("locks land with issue 4")
