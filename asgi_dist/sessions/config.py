"""Session options, validated where they enter."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SessionConfig"]


@dataclass(frozen=True)
class SessionConfig:
    """Options of the session capability (``Dist(sessions=SessionConfig(...))``)."""

    cookie_name: str = "session"
    idle_timeout: float = 14 * 24 * 3600.0
    absolute_timeout: float = 30 * 24 * 3600.0
    max_size: int = 64 * 1024
    backend: str | None = None  # "redis" | "postgres" | "memory"; default: first configured
