"""Transaction: one PostgreSQL transaction that can also write to the outbox.

A consumer handler receives one already begun; the request transaction
(:mod:`asgi_dist.transactions.request`) is one that begins on first use.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import asyncpg

from asgi_dist.backends import PostgresBackend, as_backend_unavailable
from asgi_dist.errors import TransactionError
from asgi_dist.transactions.message import (
    encode_headers,
    encode_payload,
    partition_of,
    validate_key,
    validate_topic,
)

__all__ = [
    "Outbox",
    "Transaction",
    "commit_transaction",
    "end_transaction",
    "forget_top_transaction",
    "outages",
    "raise_outage",
]


class Outbox:
    """Writes outbox rows; the relay turns them into stream entries after commit."""

    def __init__(self, postgres: PostgresBackend, max_payload: int) -> None:
        self.postgres = postgres
        self.max_payload = max_payload
        table = postgres.table("outbox")
        self._insert = (
            f"INSERT INTO {table} (msg_id, topic, key, partition, payload, headers, state,"
            " checker, max_checks, check_every, next_check_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
            " now() + make_interval(secs => $11))"
        )

    async def insert(
        self,
        conn: asyncpg.Connection,
        topic: str,
        payload: Any,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        half: tuple[str, int, float, float] | None = None,
    ) -> str:
        """Insert one row on ``conn`` (in the caller's transaction); returns the message id.

        ``half`` = (checker, max_checks, check_interval, check_after) stores a half
        message of a transactional message instead of a ready row.
        """
        validate_topic(topic)
        validate_key(key)
        text = encode_payload(payload, self.max_payload)
        head = encode_headers(headers, self.max_payload)
        msg_id = uuid.uuid4()
        checker, max_checks, every, after = half if half else (None, None, None, None)
        await conn.execute(
            self._insert,
            msg_id,
            topic,
            key,
            partition_of(key, msg_id),
            text,
            head,
            1 if half else 0,
            checker,
            max_checks,
            every,
            after,
        )
        return str(msg_id)


class Transaction:
    """A PostgreSQL transaction; ``execute/fetch/fetchrow/fetchval`` mirror asyncpg's.

    ``await tx.publish(topic, payload, key=None, headers=None)`` writes an outbox row
    in this transaction: the message leaves if and only if the transaction commits.
    """

    def __init__(self, outbox: Outbox, connection: asyncpg.Connection | None = None) -> None:
        self._outbox = outbox
        self._connection = connection
        # True while queries may go straight to the connection (no lazy BEGIN pending).
        self._ready = connection is not None
        # The last statement that failed.  Any error aborts the whole transaction, even
        # one the caller caught, and PostgreSQL then answers its COMMIT with ROLLBACK:
        # this names the cause when that happens.
        self.failed: Exception | None = None

    @property
    def connection(self) -> asyncpg.Connection:
        """The asyncpg connection running this transaction."""
        assert self._connection is not None
        return self._connection

    async def _conn(self) -> asyncpg.Connection:
        return self.connection

    # The query methods catch errors inline rather than through ``outages()``: they
    # are on every request's path, and a generator context manager costs measurably.

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 - asyncpg's signature
        conn: asyncpg.Connection = self._connection if self._ready else await self._conn()
        try:
            result: str = await conn.execute(query, *args, timeout=timeout)
        except Exception as exc:
            self._raise(exc, conn)
        return result

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - asyncpg's signature
        conn: asyncpg.Connection = self._connection if self._ready else await self._conn()
        try:
            await conn.executemany(command, args, timeout=timeout)
        except Exception as exc:
            self._raise(exc, conn)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:  # noqa: ASYNC109 - asyncpg's signature
        conn: asyncpg.Connection = self._connection if self._ready else await self._conn()
        try:
            rows: list[Any] = await conn.fetch(query, *args, timeout=timeout)
        except Exception as exc:
            self._raise(exc, conn)
        return rows

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - asyncpg's signature
        conn: asyncpg.Connection = self._connection if self._ready else await self._conn()
        try:
            return await conn.fetchrow(query, *args, timeout=timeout)
        except Exception as exc:
            self._raise(exc, conn)

    async def fetchval(
        self,
        query: str,
        *args: Any,
        column: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 - asyncpg's signature
    ) -> Any:
        conn: asyncpg.Connection = self._connection if self._ready else await self._conn()
        try:
            return await conn.fetchval(query, *args, column=column, timeout=timeout)
        except Exception as exc:
            self._raise(exc, conn)

    async def publish(
        self,
        topic: str,
        payload: Any,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Write a message to the outbox in this transaction; returns its id.

        Messages with the same ``key`` reach the topic stream in publish order.
        """
        conn = await self._conn()
        try:
            return await self._outbox.insert(conn, topic, payload, key, headers)
        except Exception as exc:
            self._raise(exc, conn)

    def _raise(self, exc: Exception, conn: asyncpg.Connection) -> NoReturn:
        if isinstance(exc, asyncpg.PostgresError):  # the server's error aborted the transaction
            self.failed = exc
        raise_outage(exc, conn)


def forget_top_transaction(transaction: Any) -> bool:
    """Detach asyncpg's top-level transaction object from its connection.

    asyncpg's own ``commit()`` and ``rollback()`` do this before they send theirs;
    we send ours (:func:`end_transaction`), so we do it ourselves (asyncpg internals:
    returns False, and the caller falls back to asyncpg's, if they ever change).
    """
    conn = getattr(transaction, "_connection", None)
    if conn is None or getattr(conn, "_top_xact", None) is not transaction:
        return False
    conn._top_xact = None
    return True


async def end_transaction(
    conn: asyncpg.Connection,
    sql: str,
    *,
    commit: bool,
    what: str,
    failed: BaseException | None = None,
) -> None:
    """Send ``sql``, our own COMMIT or ROLLBACK of the top transaction, and judge the answer.

    PostgreSQL answers the COMMIT of a transaction that an earlier error aborted
    (even one the caller caught) with ``ROLLBACK``, which asyncpg's ``commit()`` lets
    pass as success; here it raises :class:`TransactionError` naming ``what``, and
    ``failed``, the statement that failed, if known.  ``sql`` may carry statements
    around the COMMIT (a pool's reset); one of them failing leaves the transaction
    open, so it is rolled back here before the error propagates.  The caller has
    detached asyncpg's transaction object (:func:`forget_top_transaction`).
    """
    try:
        tag = await conn.execute(sql)
    except Exception as exc:
        with contextlib.suppress(Exception):
            if conn.is_in_transaction():
                await conn.execute("ROLLBACK")
        if commit and isinstance(exc, asyncpg.InFailedSQLTransactionError):
            raise _refused(what, failed) from exc
        raise
    if commit and tag == "ROLLBACK":
        raise _refused(what, failed)


async def commit_transaction(
    conn: asyncpg.Connection, transaction: Any, *, what: str, failed: BaseException | None
) -> None:
    """COMMIT asyncpg's top-level ``transaction`` on ``conn``; see :func:`end_transaction`."""
    if not forget_top_transaction(transaction):
        await transaction.commit()  # asyncpg's internals changed: its own, unchecked commit
        return
    await end_transaction(conn, "COMMIT;", commit=True, what=what, failed=failed)


def _refused(what: str, failed: BaseException | None) -> TransactionError:
    cause = f" ({type(failed).__name__}: {failed})" if failed is not None else ""
    return TransactionError(
        f"PostgreSQL refused to commit {what} and rolled it back: a statement in it failed "
        f"earlier{cause}, and an error aborts the whole transaction even when it is caught; "
        "run a step that may fail in a savepoint (`async with tx.connection.transaction():`)"
    )


def raise_outage(exc: Exception, connection: asyncpg.Connection | None = None) -> NoReturn:
    """Re-raise ``exc``, as BackendUnavailable if it is an outage (503 in a request).

    ``connection``, the one ``exc`` came from, tells a connection that closed under
    the caller from a programming error (asyncpg raises InterfaceError for both).
    """
    outage = as_backend_unavailable(exc, connection)
    if outage is None or outage is exc:
        raise exc
    raise outage from exc


@contextlib.contextmanager
def outages(connection: asyncpg.Connection | None = None) -> Iterator[None]:
    """An outage becomes BackendUnavailable (503 in a request); anything else passes as is."""
    try:
        yield
    except Exception as exc:
        outage = as_backend_unavailable(exc, connection)
        if outage is None or outage is exc:
            raise
        raise outage from exc
