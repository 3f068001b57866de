"""Distributed locks and leader election."""

from asgi_dist.locks.service import LockService

__all__ = ["LockService"]
