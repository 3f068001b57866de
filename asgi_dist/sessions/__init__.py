"""Distributed sessions: server-side, signed opaque cookie, lossless under concurrency."""

from asgi_dist.sessions.config import SessionConfig
from asgi_dist.sessions.manager import SessionManager
from asgi_dist.sessions.session import Session

__all__ = ["Session", "SessionConfig", "SessionManager"]
