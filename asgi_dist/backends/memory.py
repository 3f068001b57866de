"""The embedded default: every capability's state in this process's memory.

It implements the same semantics as the Redis and PostgreSQL backends for one
process, which is what the quick start and single-process apps need.  It says so
once in the log, because a second process would not see any of it.
"""

from __future__ import annotations

import logging
import time

__all__ = ["MemoryBackend"]

log = logging.getLogger("asgi_dist.memory")


class MemoryBackend:
    """Marker and clock of the in-process backend."""

    where = "memory://"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    @staticmethod
    def now() -> float:
        """Monotonic seconds; the memory backend's stand-in for the server clock."""
        return time.monotonic()

    async def start(self) -> None:
        log.info(
            "asgi_dist: using the embedded memory backend: locks, sessions and schedules "
            "live in this process only; set ASGI_DIST_REDIS_URL or ASGI_DIST_POSTGRES_DSN "
            "to share them across processes"
        )

    async def stop(self) -> None:
        return None
