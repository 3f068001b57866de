"""asgi_dist: distributed locks, transactions, sessions and scheduling for ASGI apps."""

from asgi_dist.context import get_locks, get_session, get_tx
from asgi_dist.dist import Dist
from asgi_dist.errors import (
    BackendUnavailable,
    ConfigError,
    DistError,
    LockError,
    LockLost,
    LockNotOwned,
    LockTimeout,
    NoRequestContext,
    SchedulerError,
    SessionError,
    SessionTooLarge,
    TransactionError,
)
from asgi_dist.middleware import DistMiddleware

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "Dist",
    "DistError",
    "DistMiddleware",
    "LockError",
    "LockLost",
    "LockNotOwned",
    "LockTimeout",
    "NoRequestContext",
    "SchedulerError",
    "SessionError",
    "SessionTooLarge",
    "TransactionError",
    "__version__",
    "get_locks",
    "get_session",
    "get_tx",
]
