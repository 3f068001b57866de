"""TransactionService: the transaction capability of one Dist.

It owns the outbox, the request hook behind ``get_tx()``, and the background
workers.  The relay and the consumers run in every process (they share the work).
The check-back of transactional messages and the purge of old rows are cluster
jobs registered with the scheduler (DESIGN: transactions registers its background
workers through scheduling), so one node runs each fire; a process whose
scheduler is off (``SchedulerConfig(enabled=False)``) runs them as its own loops,
which is safe because both claim rows with ``SKIP LOCKED`` and check-back decides
under a fence.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from asgi_dist._checks import seconds
from asgi_dist.backends import Runtime
from asgi_dist.context import RequestHook
from asgi_dist.errors import ConfigError
from asgi_dist.scheduling import JobContext, Scheduler
from asgi_dist.transactions.checkback import Check, CheckBack, TransactionalMessage
from asgi_dist.transactions.config import TransactionConfig
from asgi_dist.transactions.consumer import Consumer, ConsumerSpec, Handler
from asgi_dist.transactions.message import validate_topic
from asgi_dist.transactions.relay import Relay, purge_loop, purge_once
from asgi_dist.transactions.request import TransactionHook
from asgi_dist.transactions.schema import MIGRATIONS
from asgi_dist.transactions.transaction import Outbox

__all__ = ["CHECKBACK_JOB", "PURGE_JOB", "TransactionConfig", "TransactionService"]

log = logging.getLogger("asgi_dist.transactions")

# Internal scheduler jobs (the job-name rules allow dots; the prefix keeps them
# apart from the app's own jobs).
CHECKBACK_JOB = "asgi_dist.outbox.checkback"
PURGE_JOB = "asgi_dist.outbox.purge"
# Batches of due half messages one check-back fire handles at most (20 per batch);
# the next fire continues, so one fire cannot run unbounded.
_CHECK_BATCHES = 50


def handler_connections(pool: asyncpg.Pool) -> int:
    """How many connections of ``pool`` the consumers of a process hold at most, together.

    Each running handler holds one for its whole transaction.  Unbounded, a few slow
    handlers with ``concurrency`` near the pool's size (10 by default) would take every
    connection: requests would wait ``acquire_timeout`` and answer 503, and the relay
    could not mark what it published.  Half the pool keeps the other half for them;
    handlers beyond the bound wait for a connection with their entries heartbeated.
    """
    size: int = pool.get_max_size()
    return max(1, size // 2)


def _check_relay_pool(pool: asyncpg.Pool) -> None:
    """Refuse a pool the relay would deadlock: its LISTEN connection is held for good,
    and its statements (and every request transaction) need another."""
    size = pool.get_max_size()
    if size < 2:
        raise ConfigError(
            f"postgres=<asyncpg.Pool> has max_size={size}, but the outbox relay holds one "
            "connection for good (its LISTEN) and needs at least one more for its work and "
            "requests: create the pool with max_size >= 2 (asyncpg.create_pool(..., "
            "max_size=10)), pass a DSN instead, or turn the relay off with "
            "TransactionConfig(relay=False)"
        )


class TransactionService:
    """Request transaction, outbox relay, idempotent consumers, transactional messages."""

    def __init__(self, runtime: Runtime, config: TransactionConfig, scheduler: Scheduler) -> None:
        if not isinstance(config, TransactionConfig):
            raise ConfigError(f"transactions={config!r} must be a TransactionConfig")
        self.runtime = runtime
        self.config = config
        self.scheduler = scheduler
        self.specs: list[ConsumerSpec] = []
        self.consumers: list[Consumer] = []
        self.relay: Relay | None = None
        self._outbox: Outbox | None = None
        self._checkback: CheckBack | None = None
        self._pending_checks: list[Check] = []
        self._started = False
        self._stopping = asyncio.Event()
        self._handler_connections = asyncio.Semaphore(1)
        # Fire ids of the check-back job run in this process (newest last): lets an
        # operator or a test see which node ran which fire.
        self.checkback_fires: collections.deque[str] = collections.deque(maxlen=1000)
        self.scheduled = self._schedule_jobs()

    def _schedule_jobs(self) -> bool:
        """Register check-back and purge as scheduler jobs; False if the scheduler is off.

        Here, not in register(): a Dist may be started again, and the scheduler
        refuses a job registered twice or after it started.
        """
        if not self.active or not self.scheduler.config.enabled:
            return False
        every, config = self.scheduler.every, self.config
        # overlap="forbid": a slow fire (a check() near check_timeout, a large
        # purge) makes the next one skip instead of racing it.
        every(config.check_poll_interval, name=CHECKBACK_JOB, overlap="forbid")(self._checkback_job)
        every(config.purge_interval, name=PURGE_JOB, overlap="forbid")(self._purge_job)
        return True

    async def _checkback_job(self, ctx: JobContext) -> None:
        checkback = self._checkback
        if checkback is None or self._stopping.is_set():
            return
        self.checkback_fires.append(ctx.fire_id)
        # Errors propagate: the scheduler records the fire failed; the next fire retries.
        for _ in range(_CHECK_BATCHES):
            if not await checkback.check_once():
                break

    async def _purge_job(self, ctx: JobContext) -> None:
        postgres = self.runtime.postgres
        if postgres is None or self._stopping.is_set():
            return
        await purge_once(postgres, self.config)

    @property
    def active(self) -> bool:
        return self.config.enabled and self.runtime.postgres is not None

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            postgres = self.runtime.require_postgres("the transactional outbox")
            self._outbox = Outbox(postgres, self.config.max_payload)
        return self._outbox

    # lifecycle -------------------------------------------------------------------

    def register(self) -> None:
        if self.active:
            assert self.runtime.postgres is not None
            self.runtime.postgres.register_migrations("transactions", MIGRATIONS)

    async def start(self) -> None:
        if not self.active:
            if self.specs:
                raise ConfigError(
                    "consumers need PostgreSQL (their inbox) and Redis (their stream): "
                    "pass Dist(postgres=..., redis=...)"
                )
            return
        postgres = self.runtime.require_postgres("transactions")
        self._stopping = asyncio.Event()
        self._handler_connections = asyncio.Semaphore(handler_connections(postgres.pool))
        self._checkback = CheckBack(postgres, self.config, self._stopping)
        for check in self._pending_checks:
            self._checkback.register(check)
        redis = self.runtime.redis
        if redis is None:
            if self.specs:
                raise ConfigError(
                    "consumers read Redis Streams: pass Dist(redis=...) or set ASGI_DIST_REDIS_URL"
                )
            log.warning(
                "transactions: no Redis configured, so nothing relays the outbox here; rows "
                "wait in %s until a process with Redis relays them",
                postgres.table("outbox"),
            )
        else:
            if self.config.relay:
                _check_relay_pool(postgres.pool)
                self.relay = Relay(
                    postgres, redis, self.config, self.runtime.node_id, self._stopping
                )
                self.runtime.spawn("outbox-relay", self.relay.run)
            for spec in self.specs:
                self._spawn_consumer(spec)
        if not self.scheduled:
            self.runtime.spawn("transactions-checkback", self._checkback.run)
            self.runtime.spawn(
                "transactions-purge", lambda: purge_loop(postgres, self.config, self._stopping)
            )
        self._started = True

    async def stop(self) -> None:
        # The workers are runtime tasks: the Dist cancels and awaits them after this.
        self._started = False
        self._stopping.set()
        self.consumers.clear()
        self.relay = None

    def request_hook(self) -> RequestHook | None:
        if not self.active:
            return None
        assert self.runtime.postgres is not None
        return TransactionHook(self.outbox, self.runtime.postgres, self.config.acquire_timeout)

    # consumers -------------------------------------------------------------------

    def consumer(
        self,
        topic: str,
        *,
        group: str,
        concurrency: int = 1,
        max_deliveries: int = 5,
        timeout: float | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register ``async def handler(message, tx)`` as a member of ``group`` on ``topic``.

        Every process that registers it joins the Redis Streams consumer group;
        each message is handled by one of them, in a PostgreSQL transaction that
        also records the message id in the inbox, so its effects happen exactly
        once even when it is delivered twice.  A handler that raises (or runs past
        ``timeout`` seconds) is retried after a backoff; after ``max_deliveries``
        the message goes to the dead-letter stream ``{ns:topic:<topic>}:dead:<group>``
        with its last error.  ``concurrency`` handlers run at once per process.
        """

        def register(handler: Handler) -> Handler:
            spec = ConsumerSpec(topic, group, handler, concurrency, max_deliveries, timeout)
            # Known now, so said now: not at the next start.
            self.runtime.require_postgres(f"consumer of {topic!r}")
            self.runtime.require_redis(f"consumer of {topic!r}")
            if any(s.topic == topic and s.group == group for s in self.specs):
                raise ConfigError(
                    f"a consumer of {topic!r} in group {group!r} is already registered in this "
                    "process: use one handler per (topic, group), with concurrency=N"
                )
            self.specs.append(spec)
            if self._started:
                self._spawn_consumer(spec)
            return handler

        return register

    def _spawn_consumer(self, spec: ConsumerSpec) -> None:
        postgres = self.runtime.require_postgres(f"consumer of {spec.topic!r}")
        redis = self.runtime.require_redis(f"consumer of {spec.topic!r}")
        consumer = Consumer(
            spec,
            postgres,
            redis,
            self.outbox,
            self.config,
            self.runtime.node_id,
            self._stopping,
            self._handler_connections,
        )
        self.consumers.append(consumer)
        self.runtime.spawn(f"consumer:{spec.topic}:{spec.group}", consumer.run)

    # transactional messages ----------------------------------------------------------

    def register_check(self, check: Check) -> Check:
        """Let this process answer check-backs with ``check`` (usable as a decorator).

        ``transactional_message(..., check=fn)`` registers ``fn`` itself; register it
        at startup in every process, so that any of them can answer for a process that
        died (a process only checks messages whose ``check`` it has registered).
        """
        if self._checkback is None:
            from asgi_dist.transactions.checkback import checker_name

            checker_name(check)  # validates
            self._pending_checks.append(check)
        else:
            self._checkback.register(check)
        return check

    def transactional_message(
        self,
        topic: str,
        payload: Any,
        *,
        check: Check,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        check_after: float | None = None,
        check_interval: float | None = None,
        max_checks: int | None = None,
    ) -> TransactionalMessage:
        """A half message, made visible when the ``async with`` body exits normally.

        ``check(message)`` answers ``"commit"``, ``"rollback"`` or ``"unknown"`` (or
        True / False / None) for messages whose process died inside the body; it is
        asked first after ``check_after`` seconds (6), then every ``check_interval``
        (60), at most ``max_checks`` times (15), after which the message is discarded
        with an error in the log -- RocketMQ's defaults.
        """
        validate_topic(topic)
        if self._checkback is None:
            raise ConfigError(
                "transactional_message needs a started Dist with PostgreSQL: "
                "pass Dist(postgres=...) and use it inside the app's lifespan or `async with dist`"
            )
        name = self._checkback.register(check)
        after = self.config.check_after if check_after is None else check_after
        every = self.config.check_interval if check_interval is None else check_interval
        limit = self.config.max_checks if max_checks is None else max_checks
        after = seconds(after, "check_after", open_low=True, high=86_400)
        every = seconds(every, "check_interval", open_low=True, high=86_400)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise ConfigError(f"max_checks={limit!r} is invalid: use an integer from 1 to 10,000")
        postgres = self.runtime.require_postgres("transactional_message")
        return TransactionalMessage(
            postgres,
            self.outbox,
            topic,
            payload,
            checker=name,
            key=key,
            headers=headers,
            check_after=after,
            check_interval=every,
            max_checks=limit,
        )
