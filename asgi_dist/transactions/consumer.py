"""Idempotent consumers: Redis Streams consumer groups plus a PostgreSQL inbox.

Each delivery runs the handler in a PostgreSQL transaction that first inserts
``(group, message id)`` into the inbox, so a message delivered twice (a consumer
killed before ``XACK``, a reclaim, a relay re-publishing) has its effects exactly
once: the second insert conflicts and the delivery is acknowledged unrun.

While a handler runs, its entry is heartbeated (``XCLAIM ... IDLE 0``), so only
entries of dead consumers, or failed ones waiting for their retry, go idle long
enough for ``XAUTOCLAIM``.  A failed entry's idle time is set so that it becomes
claimable after its backoff (one longer than ``reclaim_after`` is first waited out
here); after ``max_deliveries`` it moves to the group's dead-letter stream with the
last error.  A COMMIT that PostgreSQL refuses (an error the handler caught aborted
the transaction) is a failure too: the work is gone, so the message is not acked.
A consumer that stops hands the entries it was still handling back to the group
(claimable at once, the interrupted delivery uncounted): a deploy spends no attempt.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis import exceptions as redis_errors

from asgi_dist.backends import PostgresBackend, RedisBackend, as_backend_unavailable
from asgi_dist.backends.postgres import connection_lost
from asgi_dist.backends.redis import block_ms
from asgi_dist.errors import BackendUnavailable, ConfigError, TransactionError
from asgi_dist.transactions.config import TransactionConfig
from asgi_dist.transactions.message import Message, validate_topic
from asgi_dist.transactions.relay import Backoff, stream_key, wait_event
from asgi_dist.transactions.transaction import (
    Outbox,
    Transaction,
    commit_transaction,
    raise_outage,
)

__all__ = ["Consumer", "ConsumerSpec", "Handler", "dead_letter_key"]

log = logging.getLogger("asgi_dist.transactions")

Handler = Callable[[Message, Transaction], Awaitable[Any]]
_PACKAGE = "asgi_dist.transactions"
# Names of dead consumers are pruned after an hour without activity, checked every minute
# or so by each member (random phase, so members do not prune in step).
PRUNE_IDLE = 3600.0
_PRUNE_EVERY = 60.0
# XAUTOCLAIM calls (each scanning at most 10 * count pending entries) per claim round.
_AUTOCLAIM_PAGES = 10


def dead_letter_key(redis: RedisBackend, topic: str, group: str) -> str:
    return redis.key("topic", topic, f"dead:{group}")


class HandlerFailed(Exception):
    """The handler raised (or timed out): the delivery spends an attempt."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class ConsumerSpec:
    """A ``@dist.consumer(...)`` registration, validated where it enters."""

    topic: str
    group: str
    handler: Handler
    concurrency: int = 1
    max_deliveries: int = 5
    timeout: float | None = None

    def __post_init__(self) -> None:
        validate_topic(self.topic)
        validate_topic(self.group, "group")
        if not inspect.iscoroutinefunction(self.handler):
            raise ConfigError(f"consumer {self.handler!r} must be `async def handler(message, tx)`")
        for name in ("concurrency", "max_deliveries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
                raise ConfigError(f"consumer {name}={value!r} is invalid: use an integer >= 1")
        if self.timeout is not None and (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, int | float)
            or not 0 < self.timeout < math.inf
        ):
            raise ConfigError(
                f"consumer timeout={self.timeout!r} must be None or a finite number of seconds > 0"
            )


class Consumer:
    """One process's member of a consumer group: read, reclaim, handle, ack."""

    def __init__(
        self,
        spec: ConsumerSpec,
        postgres: PostgresBackend,
        redis: RedisBackend,
        outbox: Outbox,
        config: TransactionConfig,
        name: str,
        stopping: asyncio.Event,
        connections: asyncio.Semaphore,
    ) -> None:
        self.spec = spec
        # Shared by the consumers of this process: the PostgreSQL connections their
        # handlers may hold at once (see service.handler_connections).
        self.connections = connections
        # Loops also check this flag: a cancellation swallowed by a library on
        # its way up must not keep a worker alive after stop.
        self.stopping = stopping
        self.postgres = postgres
        self.redis = redis
        self.outbox = outbox
        self.config = config
        self.name = name
        self.stream = stream_key(redis, spec.topic)
        self.dead_stream = dead_letter_key(redis, spec.topic, spec.group)
        self._claim_owned = redis.script(_PACKAGE, "claim_owned")
        self._dead_letter = redis.script(_PACKAGE, "dead_letter")
        self._prune = redis.script(_PACKAGE, "prune_consumers")
        self._hand_back = redis.script(_PACKAGE, "hand_back")
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Failed entries whose retry is due more than reclaim_after ahead, with the
        # loop.time() it is due: kept (heartbeated) here until then (see _retry_in).
        self._waiting: dict[str, float] = {}
        # Entries being handled whose outcome (committed, failed) is not decided yet: at
        # stop, those left here were abandoned and are handed back (see _hand_back_abandoned).
        self._undecided: set[str] = set()
        self._slot_freed = asyncio.Event()
        self._autoclaim_from = "0-0"  # where the next XAUTOCLAIM scan resumes
        self._inbox_insert = (
            f"INSERT INTO {postgres.table('inbox')} (grp, msg_id) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING RETURNING true"
        )
        self._register_group = (
            f"INSERT INTO {postgres.table('consumer_group')} (topic, grp) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING RETURNING true"
        )
        self.handled = 0  # handler runs committed by this process (stats, tests)
        self._names = (spec.topic, spec.group)

    # loop ------------------------------------------------------------------------

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(), name=f"asgi_dist:hb:{self.stream}")
        backoff = Backoff()
        last_claim = 0.0
        last_prune = time.monotonic() - _PRUNE_EVERY * random.random()
        try:
            await self._ensure_group(backoff)
            while not self.stopping.is_set():
                free = self.spec.concurrency - len(self._inflight)
                if free <= 0:
                    self._slot_freed.clear()
                    await wait_event(self._slot_freed, self.config.claim_interval)
                    continue
                try:
                    entries: list[tuple[str, dict[bytes, bytes] | None, int]] = []
                    now = time.monotonic()
                    if now - last_claim >= self.config.claim_interval:
                        entries += await self._autoclaim(free)
                        if len(entries) < free:
                            # Drained: look again later.  A full batch means a backlog
                            # (a dead consumer's entries): keep claiming at full speed.
                            last_claim = now
                    if now - last_prune >= _PRUNE_EVERY:
                        last_prune = now
                        try:
                            await self.prune()
                        except redis_errors.ResponseError as exc:  # hygiene, never fatal
                            log.warning("consumer %s: pruning failed: %s", self.spec.group, exc)
                    want = free - len(entries)
                    if want > 0:
                        # Capped below the socket timeout: a longer claim_interval
                        # only takes more reads (last_claim keeps the claim pace).
                        block = None if entries else block_ms(self.config.claim_interval)
                        entries += await self._read(want, block)
                    backoff.reset()
                except redis_errors.ResponseError as exc:
                    # NOGROUP / UNBLOCKED: the stream (and its group) was deleted under us.
                    if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                        log.error("consumer %s/%s: %s; retrying", *self._names, exc)
                        await backoff.sleep()
                        continue
                    await self._ensure_group(backoff)
                    continue
                except Exception as exc:
                    # An outage is waited out; anything else is logged and retried too:
                    # a consumer that died here would stop the group's work in this process.
                    if as_backend_unavailable(exc) is None:
                        log.exception("consumer %s/%s failed; retrying", *self._names)
                    else:
                        log.warning("consumer %s/%s: %s; retrying", *self._names, exc)
                    await backoff.sleep()
                    continue
                for stream_id, fields, deliveries in entries:
                    if stream_id in self._inflight:
                        continue
                    self._waiting.pop(stream_id, None)
                    task = asyncio.create_task(
                        self._handle(stream_id, fields, deliveries), name=stream_id
                    )
                    self._inflight[stream_id] = task
                    task.add_done_callback(self._done)
        finally:
            heartbeat.cancel()
            tasks = [heartbeat, *self._inflight.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._hand_back_abandoned()

    async def _hand_back_abandoned(self) -> None:
        """Make the entries whose handlers this stop cancelled claimable by the rest of
        the group now, without counting the abandoned delivery as an attempt."""
        abandoned, self._undecided = list(self._undecided), set()
        if not abandoned:
            return
        idle = int(self.config.reclaim_after * 1000)
        try:
            async with asyncio.timeout(2.0):  # bounded: stopping must not hang on Redis
                await self._hand_back(
                    self.redis.client, [self.stream], [self.spec.group, self.name, idle, *abandoned]
                )
        except Exception as exc:  # they stay pending: reclaimed after reclaim_after
            log.warning(
                "consumer %s could not hand back %d entries: %s", self.name, len(abandoned), exc
            )

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task.get_name(), None)
        self._slot_freed.set()

    async def _ensure_group(self, backoff: Backoff) -> None:
        while not self.stopping.is_set():
            try:
                await self._create_group()
                self._autoclaim_from = "0-0"  # a cursor into a group that may be new
                return
            except Exception as exc:
                if as_backend_unavailable(exc) is None:
                    raise
                log.warning("consumer %s: %s; retrying", self.spec.group, exc)
                await backoff.sleep()

    async def _create_group(self) -> None:
        """Create the group if it is missing, at the entry where its messages begin.

        A new group reads from the start of the stream: messages relayed before it
        existed are still its to handle (the outbox promised them).  A group that was
        created before (it is in the registry table) and is missing now was deleted, or
        lost with a Redis that restarted empty: it reads only the entries of the last
        ``inbox_retention``, whose inbox rows still tell which ones it handled; older
        ones would run their handlers a second time.  The registry row commits only
        once the group exists, so a process creating the same new group meanwhile waits
        on that row, then finds the group made from the start (BUSYGROUP).
        """
        async with self.postgres.pool.acquire() as conn, conn.transaction():
            new = bool(await conn.fetchval(self._register_group, *self._names))
            start = "0"
            if not new:
                since: int = await conn.fetchval(
                    "SELECT (extract(epoch FROM now()) * 1000)::bigint - $1::bigint",
                    int(self.config.inbox_retention * 1000),
                )
                start = f"{max(since, 0)}-0"
            try:
                await self.redis.client.xgroup_create(
                    self.stream, self.spec.group, id=start, mkstream=True
                )
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    return
                raise
        if not new:
            log.warning(
                "consumer group %s of %s was missing (deleted, or lost with a Redis that "
                "restarted empty): recreated from entry %s, the last inbox_retention; older "
                "entries are skipped, since the inbox no longer tells whether they were handled",
                self.spec.group,
                self.spec.topic,
                start,
            )

    async def prune(self, idle: float = PRUNE_IDLE) -> int:
        """Delete group members idle ``idle`` seconds with nothing pending (dead processes)."""
        deleted = await self._prune(
            self.redis.client, [self.stream], [self.spec.group, int(idle * 1000), self.name]
        )
        return int(deleted)

    async def _read(
        self, count: int, block: int | None
    ) -> list[tuple[str, dict[bytes, bytes] | None, int]]:
        reply: Any = await self.redis.client.xreadgroup(
            self.spec.group, self.name, {self.stream: ">"}, count=count, block=block
        )
        out: list[tuple[str, dict[bytes, bytes] | None, int]] = []
        for _stream, entries in reply or []:
            for sid, fields in entries:
                out.append((_s(sid), fields, 1))
        return out

    async def _autoclaim(self, count: int) -> list[tuple[str, dict[bytes, bytes] | None, int]]:
        """Entries idle past ``reclaim_after``: of dead consumers, or due for a retry.

        XAUTOCLAIM looks at no more than ``10 * count`` pending entries per call and
        answers where it stopped.  Live entries (heartbeated handlers of the whole
        group) sit at the head of the list, so a scan that always began at ``0-0``
        would never get past them to a dead consumer's entries: the scan resumes at
        the cursor, a few pages per call, and starts over once it wraps.
        """
        claimed: list[tuple[str, dict[bytes, bytes] | None]] = []
        for _ in range(_AUTOCLAIM_PAGES):
            reply: Any = await self.redis.client.xautoclaim(
                self.stream,
                self.spec.group,
                self.name,
                min_idle_time=int(self.config.reclaim_after * 1000),
                start_id=self._autoclaim_from,
                count=count - len(claimed),
            )
            self._autoclaim_from = _s(reply[0])
            claimed += [(_s(sid), fields) for sid, fields in reply[1] if fields is not None]
            if len(claimed) >= count or self._autoclaim_from == "0-0":
                break
        if not claimed:
            return []
        # XAUTOCLAIM counted this delivery; read the counts to number the attempt.
        pending: Any = await self.redis.client.xpending_range(
            self.stream,
            self.spec.group,
            min=claimed[0][0],
            max=claimed[-1][0],
            # Our own entries in that range: these, the running and the waiting ones.
            count=len(claimed) + len(self._inflight) + len(self._waiting) + 16,
            consumername=self.name,
        )
        counts = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return [(sid, fields, counts.get(sid, 2)) for sid, fields in claimed]

    async def _heartbeat(self) -> None:
        """Keep the entries being handled (or waiting for a distant retry) un-idle, so
        no other consumer reclaims them."""
        interval = self.config.reclaim_after / 4
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            for sid, due in list(self._waiting.items()):
                if due - loop.time() <= self.config.reclaim_after:
                    del self._waiting[sid]
                    await self._retry_in(sid, due - loop.time())
            ids = [*self._inflight, *self._waiting]
            if not ids:
                continue
            try:
                codes = await self._claim_owned(
                    self.redis.client, [self.stream], [self.spec.group, self.name, 0, *ids]
                )
            except Exception as exc:
                log.debug("consumer heartbeat failed: %s", exc)
                continue
            for sid, code in zip(ids, codes, strict=True):
                if int(code) <= 0:  # acked or taken over meanwhile: not ours to retry
                    self._waiting.pop(sid, None)
            lost = [sid for sid, code in zip(ids, codes, strict=True) if int(code) < 0]
            if lost:
                log.warning(
                    "consumer %s lost %d entries to another consumer (it was too slow to "
                    "heartbeat); the inbox keeps their effects single",
                    self.name,
                    len(lost),
                )

    # one delivery ------------------------------------------------------------------

    async def _handle(
        self, stream_id: str, fields: dict[bytes, bytes] | None, deliveries: int
    ) -> None:
        try:
            message = Message.from_entry(self.spec.topic, stream_id, fields or {}, deliveries)
        except ValueError as exc:
            await self._to_dead_letter(stream_id, str(exc), deliveries)
            return
        if deliveries > self.spec.max_deliveries and not await self._in_inbox(message):
            await self._to_dead_letter(
                stream_id,
                f"delivered {deliveries} times without success (last attempts never finished: "
                "the consumer died or stalled)",
                deliveries,
            )
            return
        backoff = Backoff(first=0.2, cap=self.config.reclaim_after / 2)
        # Until an outcome, a stop (cancellation, or the flag) abandons the delivery.
        self._undecided.add(stream_id)
        while True:
            if self.stopping.is_set():
                return  # still pending: handed back to the group as the consumer stops
            try:
                await self._run_once(message)
                break
            except asyncio.CancelledError:
                raise
            except HandlerFailed as failed:
                self._undecided.discard(stream_id)
                await self._failed(message, failed.error)
                return
            except Exception as exc:
                if as_backend_unavailable(exc) is None:
                    self._undecided.discard(stream_id)
                    await self._failed(message, exc)
                    return
                # PostgreSQL is down: not the message's fault, so no attempt is spent;
                # keep the entry (heartbeated) and try again.
                log.warning("consumer %s: %s; retrying", self.spec.group, exc)
                await backoff.sleep()
        self._undecided.discard(stream_id)  # committed
        try:
            await self.redis.client.xack(self.stream, self.spec.group, stream_id)
        except Exception as exc:
            # Committed but not acked: the redelivery finds the inbox row and is dropped.
            log.warning("consumer %s could not XACK %s: %s", self.spec.group, stream_id, exc)

    async def _in_inbox(self, message: Message) -> bool:
        """Whether a delivery past ``max_deliveries`` must be acked, not dead-lettered:
        handled before (only its XACK was lost), or being handled right now by a member
        that could not heartbeat (a handler blocked its event loop past reclaim_after).

        The probe inserts the inbox row and rolls back: an insert waits for a running
        transaction that holds the row, so it answers once that delivery has committed
        (conflict: handled) or rolled back (inserted: nobody handled it).
        """
        try:
            async with self.connections, self.postgres.pool.acquire() as conn:
                probe = conn.transaction()
                await probe.start()
                try:
                    fresh = await conn.fetchval(
                        self._inbox_insert, self.spec.group, uuid.UUID(message.id)
                    )
                finally:
                    await probe.rollback()
        except Exception as exc:
            if as_backend_unavailable(exc) is None:
                raise
            return True  # cannot tell now: run it, the inbox decides when PostgreSQL is back
        return not fresh

    async def _run_once(self, message: Message) -> None:
        async with self.connections, self.postgres.pool.acquire() as conn:
            tx = Transaction(self.outbox, conn)
            # asyncpg's transaction object, so that conn.transaction() in the handler
            # nests as a savepoint; the COMMIT is ours, to read PostgreSQL's answer.
            transaction = conn.transaction()
            try:
                await transaction.start()
                try:
                    inbox = (self._inbox_insert, self.spec.group, uuid.UUID(message.id))
                    first = bool(await conn.fetchval(*inbox))
                    if first:
                        await self._call_handler(message, tx)
                except BaseException:
                    await transaction.rollback()
                    raise
                what = "the handler's transaction"
                try:
                    await commit_transaction(conn, transaction, what=what, failed=tx.failed)
                except TransactionError as refused:
                    # An error the handler caught aborted its transaction: its work is
                    # gone, so the message failed like a handler that raised.
                    raise HandlerFailed(refused) from refused
            except HandlerFailed:
                raise
            except Exception as exc:
                # Judged while the connection is ours (a released one looks closed): one
                # that closed under the delivery makes even the ROLLBACK refuse, with an
                # InterfaceError, and is an outage to wait out.
                raise_outage(exc, conn)
        if first:
            self.handled += 1
        else:
            log.debug("message %s already handled by %s", message.id, self.spec.group)

    async def _call_handler(self, message: Message, tx: Transaction) -> None:
        conn = tx.connection
        deadline = asyncio.timeout(self.spec.timeout)
        try:
            async with deadline:
                await self.spec.handler(message, tx)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise HandlerFailed(
                    TimeoutError(f"the handler ran past its timeout of {self.spec.timeout}s")
                ) from None
            # A TimeoutError of the handler's own (a call it bounded) is its own error,
            # reported as such, not as the consumer's timeout.
            if isinstance(exc, BackendUnavailable | asyncpg.PostgresConnectionError):
                raise  # our PostgreSQL is down: not the message's fault
            if connection_lost(conn):
                raise  # whatever the handler made of it, the outage came first
            # Anything else the handler raised is the message's failure, even a
            # ConnectionError of the handler's own calls: it spends an attempt.
            raise HandlerFailed(exc) from exc

    async def _failed(self, message: Message, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        assert message.stream_id is not None
        if message.attempt >= self.spec.max_deliveries:
            log.error(
                "consumer %s/%s: message %s failed %d times; moved to the dead-letter stream: %s",
                self.spec.topic,
                self.spec.group,
                message.id,
                message.attempt,
                error,
            )
            await self._to_dead_letter(message.stream_id, error, message.attempt)
            return
        delay = min(
            self.config.retry_backoff * 2 ** (message.attempt - 1), self.config.retry_backoff_max
        )
        log.warning(
            "consumer %s/%s: message %s attempt %d failed (%s); retry in %.1fs",
            self.spec.topic,
            self.spec.group,
            message.id,
            message.attempt,
            error,
            delay,
        )
        await self._retry_in(message.stream_id, delay)

    async def _retry_in(self, stream_id: str, delay: float) -> None:
        """Make a failed entry claimable by any member of the group in ``delay`` seconds.

        XAUTOCLAIM takes entries idle for ``reclaim_after``, so an idle time of
        ``reclaim_after - delay`` schedules the retry.  Redis cannot make an entry
        idle for less than nothing (XCLAIM turns a delivery time in the future into
        now), so a longer delay is waited out here first: the entry is heartbeated
        like a running one and handed over once it is due within ``reclaim_after``.
        Should this process stop meanwhile, another member takes the entry after
        ``reclaim_after``: retried earlier than planned, never lost.
        """
        reclaim_after = self.config.reclaim_after
        if delay > reclaim_after:
            self._waiting[stream_id] = asyncio.get_running_loop().time() + delay
        idle = int((reclaim_after - min(max(delay, 0.0), reclaim_after)) * 1000)
        try:
            await self._claim_owned(
                self.redis.client, [self.stream], [self.spec.group, self.name, idle, stream_id]
            )
        except Exception as exc:  # it stays pending: reclaimed after reclaim_after
            log.warning("consumer %s could not schedule a retry: %s", self.spec.group, exc)

    async def _to_dead_letter(self, stream_id: str, error: str, deliveries: int) -> None:
        try:
            await self._dead_letter(
                self.redis.client,
                [self.stream, self.dead_stream],
                [self.spec.group, stream_id, error, deliveries, self.name],
            )
        except Exception as exc:  # it stays pending and is reclaimed later
            log.warning("consumer %s could not dead-letter %s: %s", self.spec.group, stream_id, exc)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
