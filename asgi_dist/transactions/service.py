"""TransactionService: the transaction capability of one Dist."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asgi_dist.backends import Runtime
from asgi_dist.context import RequestHook
from asgi_dist.scheduling import Scheduler

__all__ = ["TransactionConfig", "TransactionService"]


@dataclass(frozen=True)
class TransactionConfig:
    enabled: bool = True


class TransactionService:
    def __init__(self, runtime: Runtime, config: TransactionConfig, scheduler: Scheduler) -> None:
        self.runtime = runtime
        self.config = config
        self.scheduler = scheduler

    def register(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def request_hook(self) -> RequestHook | None:
        return None

    def consumer(self, topic: str, **options: Any) -> Any:
        raise NotImplementedError("transactions land with issue 6")

    def transactional_message(self, topic: str, payload: Any, **options: Any) -> Any:
        raise NotImplementedError("transactions land with issue 6")
