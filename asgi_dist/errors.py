"""One exception tree for everything asgi_dist raises.

Every message says what failed and what to do about it.  Inside a request,
:class:`~asgi_dist.DistMiddleware` answers :class:`BackendUnavailable` with
503 + ``Retry-After`` and an unhandled :class:`LockTimeout` with 409.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "DistError",
    "LockError",
    "LockLost",
    "LockNotOwned",
    "LockTimeout",
    "NoRequestContext",
    "SchedulerError",
    "SessionError",
    "SessionTooLarge",
    "TransactionError",
]


class DistError(Exception):
    """Base class of every asgi_dist error."""


class ConfigError(DistError, ValueError):
    """A configuration value is invalid; the message names it and the fix."""


class BackendUnavailable(DistError):
    """Redis, PostgreSQL or ZooKeeper could not be reached in time.

    ``retry_after`` is the number of seconds a client should wait before
    retrying; the middleware sends it as ``Retry-After`` with a 503.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoRequestContext(DistError, LookupError):
    """``get_session()``/``get_locks()``/``get_tx()`` was called outside a request."""


class LockError(DistError):
    """Base class of lock failures."""


class LockTimeout(LockError):
    """The lock could not be acquired within ``timeout``.

    ``retry_after`` estimates (from the holder's remaining lease) when it may be free.
    """

    def __init__(self, message: str, *, name: str = "", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.name = name
        self.retry_after = retry_after


class LockLost(LockError):
    """The lease of a held lock expired or was taken over before it was released.

    ``outage`` is true when the lease ran out because its backend could not be
    reached to renew it (the middleware then answers 503, else 409).
    """

    def __init__(self, message: str, *, outage: bool = False) -> None:
        super().__init__(message)
        self.outage = outage


class LockNotOwned(LockError):
    """``release()`` or ``extend()`` on a lock this handle no longer owns."""


class SessionError(DistError):
    """Base class of session failures."""


class SessionTooLarge(SessionError):
    """The serialised session exceeds ``max_size``; nothing was stored."""


class TransactionError(DistError):
    """A transaction, outbox or consumer operation failed."""


class SchedulerError(DistError):
    """A scheduler operation failed (unknown job, bad state)."""
