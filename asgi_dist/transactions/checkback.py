"""Transactional messages with check-back (RocketMQ's half messages).

``async with dist.transactional_message(topic, payload, check=fn) as msg:`` first
commits a *half* row in the outbox, which the relay ignores; the body does the
local work; a normal exit makes the row ready (the relay publishes it), an
exception deletes it.  If the process dies in between, the row stays half, and
check-back (the scheduler job ``asgi_dist.outbox.checkback``, one node per fire)
claims it once ``check_after`` has passed, asks ``check(message)`` whether the
local work committed, and commits, rolls back, or asks again ``check_interval``
later, at most ``max_checks`` times.

A check-back claim is a lease (``next_check_at`` pushed ``check_timeout`` ahead)
with a fence (``check_fence``): a check that outlives its lease cannot decide.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

from asgi_dist.backends import PostgresBackend, as_backend_unavailable
from asgi_dist.errors import ConfigError, TransactionError
from asgi_dist.transactions.config import TransactionConfig
from asgi_dist.transactions.message import Message
from asgi_dist.transactions.relay import Backoff, wait_event
from asgi_dist.transactions.transaction import Outbox, outages

__all__ = ["CheckBack", "CheckResult", "TransactionalMessage", "checker_name"]

log = logging.getLogger("asgi_dist.transactions")


class CheckResult(enum.StrEnum):
    """What a ``check`` function answers (it may also return True / False / None)."""

    COMMIT = "commit"
    ROLLBACK = "rollback"
    UNKNOWN = "unknown"


Check = Callable[[Message], Awaitable[CheckResult | str | bool | None]]


def checker_name(check: Check) -> str:
    """The name every process finds the same ``check`` function under."""
    if not callable(check) or not inspect.iscoroutinefunction(check):
        raise ConfigError(f"check={check!r} must be `async def check(message) -> 'commit' | ...`")
    return f"{check.__module__}:{check.__qualname__}"


def _result(value: object) -> CheckResult:
    if value is True:
        return CheckResult.COMMIT
    if value is False:
        return CheckResult.ROLLBACK
    if value is None:
        return CheckResult.UNKNOWN
    try:
        return CheckResult(str(value))
    except ValueError:
        log.error("check returned %r; expected 'commit', 'rollback' or 'unknown'", value)
        return CheckResult.UNKNOWN


class TransactionalMessage:
    """``async with`` a half message; ``msg.id``, ``msg.topic``, ``msg.payload``, ``msg.key``."""

    def __init__(
        self,
        postgres: PostgresBackend,
        outbox: Outbox,
        topic: str,
        payload: Any,
        *,
        checker: str,
        key: str | None,
        headers: Mapping[str, str] | None,
        check_after: float,
        check_interval: float,
        max_checks: int,
    ) -> None:
        self._postgres = postgres
        self._outbox = outbox
        self.topic = topic
        self.payload = payload
        self.key = key
        self.headers = dict(headers or {})
        self.id = ""
        self._half = (checker, max_checks, check_interval, check_after)
        self._table = postgres.table("outbox")

    async def __aenter__(self) -> TransactionalMessage:
        # The half row is committed on its own: it must outlive this process.
        with outages():
            async with self._postgres.pool.acquire() as conn:
                self.id = await self._outbox.insert(
                    conn, self.topic, self.payload, self.key, self.headers or None, half=self._half
                )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self._decide(
                f"UPDATE {self._table} SET state = 0 WHERE msg_id = $1 AND state = 1",
                "commit",
            )
        else:
            # Best effort: if this fails, check-back asks `check` and decides.
            try:
                await asyncio.shield(
                    self._decide(
                        f"DELETE FROM {self._table} WHERE msg_id = $1 AND state = 1", "rollback"
                    )
                )
            except Exception as exc2:
                log.error("transactional message %s: rollback failed (%s)", self.id, exc2)

    async def _decide(self, sql: str, what: str) -> None:
        pool = self._postgres.pool
        with outages():
            status = await pool.execute(sql, self.id)
            if status.split()[-1] == "1":
                return
            # The body outlived check_after and check-back decided first: fine if it
            # decided the same.  A committed row stays (state 0) until long after it
            # is published; a rolled-back or discarded one is deleted.
            state = await pool.fetchval(
                f"SELECT state FROM {self._table} WHERE msg_id = $1", self.id
            )
        committed = state == 0
        if committed == (what == "commit"):
            return
        decided = "committed (sent)" if committed else "rolled back (discarded)"
        raise TransactionError(
            f"transactional message {self.id} could not {what}: check-back already {decided} "
            f"it, because the body ran past check_after and check() answered (or stayed "
            "'unknown' for max_checks checks): the local work and the message disagree; make "
            "check() answer 'unknown' while the work is in progress, or raise check_after"
        )


class CheckBack:
    """The check-back loop of one process: it resolves half messages whose owner vanished."""

    def __init__(
        self, postgres: PostgresBackend, config: TransactionConfig, stopping: asyncio.Event
    ) -> None:
        self.postgres = postgres
        self.stopping = stopping
        self.config = config
        self.checkers: dict[str, Check] = {}
        table = postgres.table("outbox")
        self._claim = f"""
            UPDATE {table} SET next_check_at = now() + make_interval(secs => $2),
                   check_fence = check_fence + 1
            WHERE seq IN (SELECT seq FROM {table}
                          WHERE state = 1 AND next_check_at <= now() AND checker = ANY($1)
                          ORDER BY next_check_at LIMIT 20 FOR UPDATE SKIP LOCKED)
            RETURNING seq, msg_id, topic, key, payload, headers, checker, check_fence,
                      checks, max_checks, check_every"""
        self._commit = (
            f"UPDATE {table} SET state = 0 WHERE seq = $1 AND state = 1 AND check_fence = $2"
        )
        self._rollback = f"DELETE FROM {table} WHERE seq = $1 AND state = 1 AND check_fence = $2"
        self._later = (
            f"UPDATE {table} SET checks = checks + 1,"
            " next_check_at = now() + make_interval(secs => $3)"
            " WHERE seq = $1 AND state = 1 AND check_fence = $2"
        )
        self.resolved: dict[str, int] = {r.value: 0 for r in CheckResult}

    def register(self, check: Check) -> str:
        name = checker_name(check)
        self.checkers[name] = check
        return name

    async def run(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                while await self.check_once():
                    pass
                backoff.reset()
            except Exception as exc:
                if as_backend_unavailable(exc) is None:
                    log.exception("transactional message check-back failed; retrying")
                else:
                    log.warning("transactional message check-back: %s; retrying", exc)
                await backoff.sleep()
                continue
            await wait_event(self.stopping, self.config.check_poll_interval)

    async def check_once(self) -> int:
        """Check the due half messages this process can check; returns how many."""
        if not self.checkers:
            return 0
        pool = self.postgres.pool
        rows = await pool.fetch(self._claim, list(self.checkers), self.config.check_timeout)
        for row in rows:
            await self._check(row)
        return len(rows)

    async def _check(self, row: Any) -> None:
        msg_id = str(row["msg_id"])
        message = Message(
            id=msg_id,
            topic=row["topic"],
            payload=json.loads(row["payload"]),
            key=row["key"],
            headers=json.loads(row["headers"]) if row["headers"] else {},
            attempt=row["checks"] + 1,
        )
        check = self.checkers.get(row["checker"])
        result = CheckResult.UNKNOWN
        if check is None:
            log.error("transactional message %s: no check function %s", msg_id, row["checker"])
        else:
            try:
                async with asyncio.timeout(self.config.check_timeout * 0.8):
                    result = _result(await check(message))
            except Exception as exc:
                log.warning("check %s of message %s raised %r", row["checker"], msg_id, exc)
        pool = self.postgres.pool
        seq, fence = row["seq"], row["check_fence"]
        if result is CheckResult.UNKNOWN and row["checks"] + 1 >= (row["max_checks"] or 15):
            log.error(
                "transactional message %s on %s stayed unknown after %d checks; discarded "
                "(payload: %.200s)",
                msg_id,
                row["topic"],
                row["checks"] + 1,
                row["payload"],
            )
            result = CheckResult.ROLLBACK
        if result is CheckResult.COMMIT:
            status = await pool.execute(self._commit, seq, fence)
        elif result is CheckResult.ROLLBACK:
            status = await pool.execute(self._rollback, seq, fence)
        else:
            status = await pool.execute(self._later, seq, fence, row["check_every"])
        if status.split()[-1] == "1":
            self.resolved[result.value] += 1
        else:
            log.warning("check-back of %s outlived its claim; a newer check decides", msg_id)
