"""The request-scoped PostgreSQL transaction (``get_tx()``) and its per-endpoint options.

The transaction begins on first use, so a request that never touches it takes no
connection.  It is decided before ``http.response.start`` is forwarded: committed
when the status is below 400 (by default), rolled back otherwise; a failed commit
turns the response into a 500, so the client never sees success for lost work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import asyncpg

from asgi_dist._types import Message, Scope
from asgi_dist.backends import PostgresBackend
from asgi_dist.context import RequestContext
from asgi_dist.errors import ConfigError, TransactionError
from asgi_dist.transactions.transaction import Outbox, Transaction, raise_outage

__all__ = ["RequestTransaction", "TransactionHook", "TransactionOptions", "transactional"]

log = logging.getLogger("asgi_dist.transactions")

Isolation = Literal["read_committed", "repeatable_read", "serializable"]
_ISOLATIONS = ("read_committed", "repeatable_read", "serializable")
_OPTIONS_ATTR = "__asgi_dist_transaction__"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TransactionOptions:
    """How one endpoint's request transaction begins and ends (see :func:`transactional`)."""

    isolation: Isolation | None = None
    readonly: bool = False
    deferrable: bool = False
    rollback_on: Callable[[int], bool] = lambda status: status >= 400

    def __post_init__(self) -> None:
        if self.isolation is not None and self.isolation not in _ISOLATIONS:
            raise ConfigError(
                f"isolation={self.isolation!r} is invalid: use one of {', '.join(_ISOLATIONS)}"
            )
        if self.deferrable and not (self.readonly and self.isolation == "serializable"):
            raise ConfigError(
                "deferrable=True only applies to readonly=True, isolation='serializable'"
            )


DEFAULT_OPTIONS = TransactionOptions()


def transactional(
    *,
    isolation: Isolation | None = None,
    readonly: bool = False,
    deferrable: bool = False,
    rollback_on: int | Callable[[int], bool] = 400,
) -> Callable[[F], F]:
    """Per-endpoint options of the request transaction; the endpoint itself is unchanged.

    ``rollback_on`` is the lowest status that rolls back (default 400) or a predicate
    on the status, e.g. ``rollback_on=lambda s: s >= 500`` to keep work on a 4xx.  Works
    on Starlette and FastAPI endpoints in either decorator order, and on Quart views
    below ``@app.route`` (it finds the endpoint when the transaction begins).
    """
    if isinstance(rollback_on, bool) or not (isinstance(rollback_on, int) or callable(rollback_on)):
        raise ConfigError(
            f"rollback_on={rollback_on!r} is invalid: pass the lowest status that rolls back "
            "(e.g. 500) or a function of the status returning True to roll back"
        )
    if isinstance(rollback_on, int):
        threshold = rollback_on
        predicate: Callable[[int], bool] = lambda status: status >= threshold  # noqa: E731
    else:
        predicate = rollback_on
    options = TransactionOptions(isolation, readonly, deferrable, predicate)

    def decorate(endpoint: F) -> F:
        setattr(endpoint, _OPTIONS_ATTR, options)
        return endpoint

    return decorate


def options_for(scope: Scope) -> TransactionOptions:
    """The endpoint's options, read when the transaction begins (inside the endpoint).

    Starlette and FastAPI routers put the endpoint in the scope; Quart keeps it in
    its request context.
    """
    endpoint = scope.get("endpoint")
    if endpoint is None and "quart" in sys.modules:
        endpoint = _quart_endpoint()
    options = getattr(endpoint, _OPTIONS_ATTR, None)
    return options if isinstance(options, TransactionOptions) else DEFAULT_OPTIONS


def _quart_endpoint() -> Any:
    from quart import current_app, has_request_context, has_websocket_context, request, websocket

    if has_request_context():
        rule = request.url_rule
    elif has_websocket_context():
        rule = websocket.url_rule
    else:
        return None
    return current_app.view_functions.get(rule.endpoint) if rule is not None else None


class RequestTransaction(Transaction):
    """What ``get_tx()`` returns: the request's transaction, begun on first use."""

    def __init__(
        self, outbox: Outbox, postgres: PostgresBackend, scope: Scope, acquire_timeout: float
    ) -> None:
        super().__init__(outbox)
        self._postgres = postgres
        self._scope = scope
        self._acquire_timeout = acquire_timeout
        self._transaction: Any = None
        self._options = DEFAULT_OPTIONS
        # Made on first use: most requests never begin, and none begins twice.
        self._begin_lock: asyncio.Lock | None = None
        self._state: Literal["idle", "open", "committed", "rolled back"] = "idle"

    @property
    def state(self) -> str:
        """``idle`` (never used), ``open``, ``committed`` or ``rolled back``."""
        return self._state

    @property
    def connection(self) -> asyncpg.Connection:
        """The connection of the begun transaction (``await tx.begin()`` first)."""
        if self._connection is None or self._state != "open":
            raise TransactionError(
                f"the request transaction is {self._state}: call `await tx.begin()` or run a "
                "query before using tx.connection"
            )
        return self._connection

    async def begin(self) -> asyncpg.Connection:
        """Take a connection and BEGIN (done for you by the first query); returns it."""
        return await self._conn()

    async def _conn(self) -> asyncpg.Connection:
        if self._state == "open":
            assert self._connection is not None
            return self._connection
        if self._begin_lock is None:  # no await since the check: no other task can race
            self._begin_lock = asyncio.Lock()
        async with self._begin_lock:  # two tasks of one request must not BEGIN twice
            if self._state == "idle":
                await self._begin()
        if self.state != "open":
            raise TransactionError(
                f"the request transaction is already {self._state} (it is decided when the "
                "response starts): do database work before returning the response"
            )
        assert self._connection is not None
        return self._connection

    async def _begin(self) -> None:
        options = self._options = options_for(self._scope)
        pool = self._postgres.pool
        # Outages are mapped inline, not with outages(): this runs on every request
        # that uses the database, and a generator context manager costs measurably.
        try:
            if pool.get_idle_size():
                conn = await pool.acquire()  # an idle connection: nothing to wait for
            else:
                # Bounded wait for a busy pool; asyncio.timeout, not acquire(timeout=),
                # whose wait_for would cost a task per request.
                async with asyncio.timeout(self._acquire_timeout):
                    conn = await pool.acquire()
        except Exception as exc:
            raise_outage(exc)
        try:
            transaction = conn.transaction(
                isolation=options.isolation,
                readonly=options.readonly,
                deferrable=options.deferrable,
            )
            await transaction.start()
        except BaseException as exc:
            await _release(pool, conn)
            if isinstance(exc, Exception):
                raise_outage(exc)
            raise
        self._connection = conn
        self._transaction = transaction
        self._state = "open"
        self._ready = True

    def rolls_back(self, status: int) -> bool:
        return self._options.rollback_on(status)

    async def commit(self) -> None:
        """Commit now; raises :class:`TransactionError` if PostgreSQL refuses."""
        if self._state != "open":
            return
        try:
            await self._transaction.commit()
        except Exception as exc:
            self._state = "rolled back"
            self._ready = False
            raise TransactionError(
                f"the request transaction failed to commit ({type(exc).__name__}: {exc})"
            ) from exc
        self._state = "committed"
        self._ready = False

    async def rollback(self) -> None:
        if self._state != "open":
            return
        self._state = "rolled back"
        self._ready = False
        try:
            await self._transaction.rollback()
        except Exception as exc:  # the connection is discarded on release anyway
            log.warning("request transaction rollback failed: %s", exc)

    async def finish(self, status: int) -> None:
        """Commit (or roll back, per the endpoint's options) and return the connection.

        Done when the response starts, so a streaming body holds no connection.
        Raises :class:`TransactionError` if the commit fails.
        """
        try:
            if self.rolls_back(status):
                await self.rollback()
            else:
                await self.commit()
        finally:
            conn, self._connection = self._connection, None
            if conn is not None:
                await _release(self._postgres.pool, conn)

    @property
    def holds_connection(self) -> bool:
        return self._connection is not None

    async def close(self) -> None:
        """Roll back whatever is still open and give the connection back to the pool."""
        try:
            await self.rollback()
        finally:
            conn, self._connection = self._connection, None
            if conn is not None:
                await _release(self._postgres.pool, conn)


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    try:
        await pool.release(conn)
    except Exception as exc:  # a broken connection: the pool replaces it
        log.debug("releasing a PostgreSQL connection failed: %s", exc)
        conn.terminate()


class TransactionHook:
    """Attaches a :class:`RequestTransaction` to every request when PostgreSQL is configured."""

    def __init__(self, outbox: Outbox, postgres: PostgresBackend, acquire_timeout: float) -> None:
        self._outbox = outbox
        self._postgres = postgres
        self._acquire_timeout = acquire_timeout

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.tx = RequestTransaction(self._outbox, self._postgres, ctx.scope, self._acquire_timeout)

    async def on_response_start(self, ctx: RequestContext, message: Message) -> None:
        tx = ctx.tx
        if tx is None or tx.state != "open":
            return
        # A websocket accept has no status: accepting is success.
        await tx.finish(int(message.get("status", 200)))

    async def on_finish(self, ctx: RequestContext, error: BaseException | None) -> None:
        tx = ctx.tx
        if tx is None or not tx.holds_connection:
            return  # the usual case: decided and released when the response started
        # Shielded: a cancelled request (client gone) must still return its connection.
        closing = asyncio.ensure_future(tx.close())
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(closing)
        if not closing.done():
            # We were cancelled; let the close finish on its own, then re-raise.
            raise asyncio.CancelledError
