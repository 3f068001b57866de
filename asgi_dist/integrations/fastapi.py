"""FastAPI: ``Annotated`` dependency aliases for the request-scoped objects.

    from asgi_dist.integrations.fastapi import SessionDep, LocksDep, TxDep

    @app.post("/cart")
    async def add(item: str, session: SessionDep, tx: TxDep): ...

The dependencies are ``async`` so that they run in the request's task and see
its context (a sync dependency would run in a worker thread).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from asgi_dist.context import get_locks, get_session, get_tx
from asgi_dist.locks.request import RequestLocks
from asgi_dist.sessions.session import Session
from asgi_dist.transactions.request import RequestTransaction

__all__ = ["LocksDep", "SessionDep", "TxDep", "locks", "session", "tx"]


async def session() -> Session:
    return get_session()


async def locks() -> RequestLocks:
    return get_locks()


async def tx() -> RequestTransaction:
    return get_tx()


SessionDep = Annotated[Session, Depends(session)]
LocksDep = Annotated[RequestLocks, Depends(locks)]
TxDep = Annotated[RequestTransaction, Depends(tx)]
