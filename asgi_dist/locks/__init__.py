"""Distributed locks and leader election.

``Dist`` exposes the factories (``dist.lock``, ``dist.rwlock``, ``dist.semaphore``,
``dist.election``, ``dist.locked``, ``dist.locks.redlock``); these are the types
they return.
"""

from asgi_dist.locks.election import Election, Term
from asgi_dist.locks.lease import Held
from asgi_dist.locks.lock import Lock
from asgi_dist.locks.request import RequestLocks
from asgi_dist.locks.rwlock import RWLock
from asgi_dist.locks.service import LockService, Redlock

__all__ = ["Election", "Held", "Lock", "LockService", "RWLock", "Redlock", "RequestLocks", "Term"]
