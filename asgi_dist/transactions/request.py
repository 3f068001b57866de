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
from typing import Any, Literal, NoReturn, TypeVar

import asyncpg

from asgi_dist._types import Message, Scope
from asgi_dist.backends import PostgresBackend, as_backend_unavailable
from asgi_dist.context import RequestContext
from asgi_dist.errors import BackendUnavailable, ConfigError, TransactionError
from asgi_dist.transactions.transaction import (
    Outbox,
    Transaction,
    commit_transaction,
    end_transaction,
    forget_top_transaction,
    raise_outage,
)

__all__ = ["RequestTransaction", "TransactionHook", "TransactionOptions", "transactional"]

log = logging.getLogger("asgi_dist.transactions")

Isolation = Literal["read_committed", "repeatable_read", "serializable"]
_ISOLATIONS = ("read_committed", "repeatable_read", "serializable")
_OPTIONS_ATTR = "__asgi_dist_transaction__"
_WHAT = "the request transaction"

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
    if isinstance(rollback_on, int) and not 200 <= rollback_on <= 600:
        raise ConfigError(
            f"rollback_on={rollback_on!r} is not a status: use 200 to 599 (the lowest status "
            "that rolls back, e.g. 500), or 600 to commit whatever the status"
        )
    for label, flag in (("readonly", readonly), ("deferrable", deferrable)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{label}={flag!r} is invalid: pass True or False")
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
    """What ``get_tx()`` returns: the request's transaction, begun on first use.

    Made by the first ``get_tx()`` of a request, so a request that never asks
    for it costs nothing here.
    """

    def __init__(self, hook: TransactionHook, scope: Scope) -> None:
        super().__init__(hook.outbox)
        self._hook = hook
        self._scope = scope
        self._transaction: Any = None
        self._options = DEFAULT_OPTIONS
        self._state: Literal["idle", "beginning", "open", "committed", "rolled back", "closed"] = (
            "idle"
        )
        # Set while a second task of the request waits for the first one's BEGIN.
        self._begun: asyncio.Event | None = None

    @property
    def state(self) -> str:
        """``idle`` (never used), ``open``, ``committed`` or ``rolled back``.

        ``beginning`` while the first query takes a connection and sends BEGIN;
        ``closed`` when an HTTP response started before it was used.
        """
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
        # A state machine rather than an asyncio.Lock: the first query of a request
        # takes the uncontended path, and only a second task of the same request
        # that arrives during BEGIN waits (then retries if that BEGIN failed).
        while self._state != "open":
            if self._state == "idle":
                self._state = "beginning"
                try:
                    await self._begin()
                finally:
                    if self._state == "beginning":  # failed or cancelled: the next use retries
                        self._state = "idle"
                    begun, self._begun = self._begun, None
                    if begun is not None:
                        begun.set()
            elif self._state == "beginning":
                if self._begun is None:
                    self._begun = asyncio.Event()
                await self._begun.wait()
            elif self._scope["type"] == "websocket":
                # A websocket works after its handshake: once a transaction is decided
                # (at the accept, or by commit()), the next use begins another.
                await self._give_back()
                self._state = "idle"
            else:
                raise self._too_late()
        assert self._connection is not None
        return self._connection

    def _too_late(self) -> TransactionError:
        if self._state == "closed":
            what = "was not used before the response started"
        else:
            what = f"is already {self._state} (it is decided when the response starts)"
        return TransactionError(
            f"the request transaction {what}, so work done in it now would be lost: do the "
            "database work before returning the response, or, in a background task, open "
            "a transaction of your own from the pool "
            "(`async with pool.acquire() as conn, conn.transaction(): ...`)"
        )

    async def _begin(self) -> None:
        options = self._options = options_for(self._scope)
        pool = self._hook.postgres.pool
        # Outages are mapped inline, not with outages(): this runs on every request
        # that uses the database, and a generator context manager costs measurably.
        try:
            if _has_free_slot(pool):
                conn = await pool.acquire()  # nothing to wait for
            else:
                # Bounded wait for a busy pool; asyncio.timeout, not acquire(timeout=),
                # whose wait_for would cost a task per request.
                async with asyncio.timeout(self._hook.acquire_timeout):
                    conn = await pool.acquire()
        except Exception as exc:
            raise_outage(exc)
        try:
            # asyncpg's own transaction object, so that conn.transaction() inside the
            # request nests as a savepoint and a release rolls back what is left open.
            transaction = conn.transaction(
                isolation=options.isolation,
                readonly=options.readonly,
                deferrable=options.deferrable,
            )
            await transaction.start()
        except BaseException as exc:
            # Judged before the release: a released proxy looks like a closed connection.
            outage = as_backend_unavailable(exc, conn) if isinstance(exc, Exception) else None
            await _release(self._hook.postgres, conn)
            if outage is not None:
                raise outage from exc
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
        self._ready = False
        assert self._connection is not None
        try:
            await commit_transaction(
                self._connection, self._transaction, what=_WHAT, failed=self.failed
            )
        except Exception as exc:
            self._commit_failed(exc)
        self._state = "committed"

    async def rollback(self) -> None:
        if self._state != "open":
            return
        self._state = "rolled back"
        self._ready = False
        try:
            await self._transaction.rollback()
        except Exception as exc:  # the connection is discarded on release anyway
            self._rollback_failed(exc)

    def _commit_failed(self, exc: Exception) -> NoReturn:
        self._state = "rolled back"
        if isinstance(exc, TransactionError):
            raise exc
        lost = self._lost(exc)
        if lost is not None:
            raise lost from exc
        raise TransactionError(
            f"the request transaction failed to commit ({type(exc).__name__}: {exc})"
        ) from exc

    def _rollback_failed(self, exc: Exception) -> None:
        if self._lost(exc) is None:  # a closed connection has nothing left to roll back
            log.warning("request transaction rollback failed: %s", exc)

    def _lost(self, exc: Exception) -> BackendUnavailable | None:
        """PostgreSQL unreachable, if asyncpg refused to send because the connection closed.

        Only a refusal (``InterfaceError``) says that the COMMIT never left, so that
        nothing was saved and a retry is safe: a 503.  A connection lost during the
        COMMIT leaves its outcome unknown, and stays a failed commit.
        """
        if self._connection is None or not isinstance(exc, asyncpg.InterfaceError):
            return None
        return as_backend_unavailable(exc, self._connection)

    async def finish(self, status: int) -> None:
        """Commit (or roll back, per the endpoint's options) and return the connection.

        Done when the response starts, so a streaming body holds no connection.
        Raises :class:`TransactionError` if the commit fails.
        """
        try:
            if self._state == "open":
                await self._end(commit=not self._options.rollback_on(status))
        finally:
            if self._connection is not None:
                await self._give_back()

    async def _end(self, commit: bool) -> None:
        """COMMIT or ROLLBACK in a message of our own (:func:`end_transaction`).

        On a pool we made, the message also carries the pool's reset query, which a
        hand-written ``async with pool.acquire() as conn, conn.transaction()`` sends
        in a second round trip on release, and the connection goes back here.
        """
        conn = self._connection
        assert conn is not None
        postgres = self._hook.postgres
        with_reset = postgres.skips_reset
        sql: str | None
        try:
            if with_reset:
                reset = conn.get_reset_query()
                sql = _closing_sql(reset) if commit else f"ROLLBACK;\n{reset}"
            else:
                sql = "COMMIT;" if commit else "ROLLBACK;"
        except asyncpg.InterfaceError:
            sql = None  # the connection closed: asyncpg's commit()/rollback() refuse and say so
        if sql is None or not forget_top_transaction(self._transaction):
            await (self.commit() if commit else self.rollback())
            return
        # asyncpg no longer tracks the transaction, as after its own commit().
        self._ready = False
        self._state = "rolled back"  # until PostgreSQL confirms the COMMIT
        try:
            await end_transaction(conn, sql, commit=commit, what=_WHAT, failed=self.failed)
        except Exception as exc:
            if commit:
                self._commit_failed(exc)
            self._rollback_failed(exc)
            return  # the connection goes back through the pool's own reset
        if commit:
            self._state = "committed"
        if with_reset:
            self._connection = None
            await _release(postgres, conn, reset_sent=True)

    @property
    def holds_connection(self) -> bool:
        return self._connection is not None

    async def close(self) -> None:
        """Roll back whatever is still open and give the connection back to the pool."""
        try:
            await self.rollback()
        finally:
            await self._give_back()

    async def _give_back(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None:
            await _release(self._hook.postgres, conn)


def _has_free_slot(pool: asyncpg.Pool) -> bool:
    """Whether ``pool.acquire()`` goes without waiting for someone else's release.

    asyncpg keeps its free slots in ``pool._queue``; ``get_idle_size()`` walks every
    slot instead and cost 3 % of a request's instructions (cachegrind), so it is only
    the fallback should asyncpg change.  A free slot may still have to connect: the
    pool's connect timeout bounds that.
    """
    queue = getattr(pool, "_queue", None)
    if isinstance(queue, asyncio.Queue):
        return not queue.empty()
    return bool(pool.get_idle_size())


async def _release(
    postgres: PostgresBackend, conn: asyncpg.Connection, *, reset_sent: bool = False
) -> None:
    """Give ``conn`` back to the pool (without its reset round trip if ``reset_sent``)."""
    try:
        if reset_sent:
            await postgres.release_reset(conn)
        else:
            await postgres.pool.release(conn)
    except Exception as exc:  # a broken connection: the pool replaces it
        log.debug("releasing a PostgreSQL connection failed: %s", exc)
        conn.terminate()


# Statements of asyncpg's reset query that need a healthy transaction and go before
# the COMMIT: in a transaction aborted by an error the endpoint caught, they fail,
# so the request answers 500 instead of PostgreSQL turning the COMMIT into a silent
# ROLLBACK.  The rest go after it, as in asyncpg's reset: a SET LOCAL (e.g.
# synchronous_commit) still applies to the COMMIT, and a session advisory lock is
# held until the data it guards is visible.
_BEFORE_COMMIT = ("CLOSE ALL;", "UNLISTEN *;")
_AFTER_COMMIT = ("SELECT pg_advisory_unlock_all();", "RESET ALL;")
_closing: dict[str, str | None] = {}


def _closing_sql(reset_query: str) -> str | None:
    """asyncpg's reset around a COMMIT, as one message; None for a reset query we do not know."""
    try:
        return _closing[reset_query]
    except KeyError:
        pass
    statements = [line.strip() for line in reset_query.splitlines() if line.strip()]
    sql = None
    if all(st in _BEFORE_COMMIT or st in _AFTER_COMMIT for st in statements):
        before = [st for st in statements if st in _BEFORE_COMMIT]
        after = [st for st in statements if st in _AFTER_COMMIT]
        sql = "\n".join([*before, "COMMIT;", *after])
    _closing[reset_query] = sql
    return sql


class TransactionHook:
    """Gives every request a :class:`RequestTransaction` when PostgreSQL is configured.

    Nothing is made per request until ``get_tx()`` asks: the request context only
    learns where to get one.
    """

    def __init__(self, outbox: Outbox, postgres: PostgresBackend, acquire_timeout: float) -> None:
        self.outbox = outbox
        self.postgres = postgres
        self.acquire_timeout = acquire_timeout
        # What get_tx() returns in an HTTP request whose response started before it
        # used its transaction (a background task): one that refuses work nothing
        # would commit.  Shared by all such requests, so they allocate nothing.
        self._closed = RequestTransaction(self, {"type": "http"})
        self._closed._state = "closed"

    def transaction(self, scope: Scope) -> RequestTransaction:
        """The request transaction of ``scope`` (called once per request, by ``get_tx()``)."""
        return RequestTransaction(self, scope)

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.transactions = self

    def check_response(self, ctx: RequestContext) -> None:
        pass

    async def on_response_start(self, ctx: RequestContext, message: Message) -> None:
        tx = ctx.tx
        if tx is None or tx._state != "open":
            if message["type"] == "http.response.start":
                if tx is None:
                    ctx.tx = self._closed
                elif tx._state == "idle":
                    tx._state = "closed"
            return
        # A websocket accept has no status: accepting is success.
        await tx.finish(int(message.get("status", 200)))

    async def on_response_end(self, ctx: RequestContext) -> None:
        return None

    async def on_finish(self, ctx: RequestContext, error: BaseException | None) -> None:
        tx = ctx.tx
        if tx is None or tx._connection is None:
            return  # the usual case: decided and released when the response started
        # An HTTP transaction still open here never saw its response start: it rolls
        # back.  A websocket's work after the accept commits if the websocket ended
        # without an error (a client's disconnect is no error).
        commit = ctx.scope["type"] == "websocket" and tx._state == "open" and _clean_end(error)
        # Shielded: a cancelled request (client gone) must still return its connection.
        closing = asyncio.ensure_future(_commit_websocket(tx, ctx) if commit else tx.close())
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(closing)
        if not closing.done():
            # We were cancelled; let the close finish on its own, then re-raise.
            raise asyncio.CancelledError


def _clean_end(error: BaseException | None) -> bool:
    """A websocket that returned, or whose client disconnected; not one that raised or
    was cancelled (e.g. by its server shutting down)."""
    if error is None:
        task = asyncio.current_task()
        return task is None or not task.cancelling()
    websockets = sys.modules.get("starlette.websockets")
    return websockets is not None and isinstance(error, websockets.WebSocketDisconnect)


async def _commit_websocket(tx: RequestTransaction, ctx: RequestContext) -> None:
    try:
        await tx.finish(200)
    except Exception as exc:  # the client has gone: the log is the only one to tell
        log.error("websocket %s: its transaction was not saved: %s", ctx.scope.get("path"), exc)
