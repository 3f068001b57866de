"""Distributed locks and leader election."""

from asgi_dist.locks.election import Election, Term
from asgi_dist.locks.lease import Held
from asgi_dist.locks.lock import Lock
from asgi_dist.locks.service import LockService

__all__ = ["Election", "Held", "Lock", "LockService", "Term"]
