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
from asgi_dist.scheduling import SchedulerConfig
from asgi_dist.sessions import SessionConfig
from asgi_dist.transactions import TransactionConfig

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
    "SchedulerConfig",
    "SchedulerError",
    "SessionConfig",
    "SessionError",
    "SessionTooLarge",
    "TransactionConfig",
    "TransactionError",
    "__version__",
    "get_locks",
    "get_session",
    "get_tx",
]
