"""Request-scoped locks (``get_locks()``)."""

from __future__ import annotations

__all__ = ["RequestLocks"]


class RequestLocks:
    """Placeholder until the lock capability lands."""
