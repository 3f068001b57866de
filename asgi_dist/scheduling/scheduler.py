"""Scheduler: the scheduling capability of one Dist."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asgi_dist.backends import Runtime
from asgi_dist.context import RequestHook
from asgi_dist.locks import LockService

__all__ = ["Scheduler", "SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig:
    enabled: bool = True


class Scheduler:
    def __init__(self, runtime: Runtime, config: SchedulerConfig, locks: LockService) -> None:
        self.runtime = runtime
        self.config = config
        self.locks = locks

    def register(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def request_hook(self) -> RequestHook | None:
        return None

    def cron(self, expression: str, **options: Any) -> Any:
        raise NotImplementedError("scheduling lands with issue 5")

    def every(self, **options: Any) -> Any:
        raise NotImplementedError("scheduling lands with issue 5")
