"""Scheduler: the scheduling capability of one Dist.

Every process hosts one in its lifespan.  All of them campaign in the
``scheduler`` election (asgi_dist.locks); the leader computes due fires from
the server clock and claims each one in the store (:mod:`.store`).  The lease is
for efficiency, the claim for correctness: a leader that wakes from a pause with
an old term is refused by the fence check, and even two leaders of the same term
could not take one fire twice, because the claim compares-and-sets the job's
next fire and records a claim key that outlives the period.

Followers wait in the election and send the scheduler's store nothing; only
nodes with ``run_on="any"`` or broadcast jobs also block on the dispatch streams
(:mod:`.dispatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

from asgi_dist.backends import Runtime, as_backend_unavailable
from asgi_dist.context import RequestHook
from asgi_dist.errors import ConfigError, LockLost, SchedulerError
from asgi_dist.locks import LockService
from asgi_dist.scheduling.config import SchedulerConfig
from asgi_dist.scheduling.dispatch import Dispatcher
from asgi_dist.scheduling.jobs import (
    Job,
    JobFunc,
    JobOptions,
    Misfire,
    Overlap,
    Registry,
    RunOn,
    as_tuple,
    check_function,
    default_name,
    validate_job_name,
)
from asgi_dist.scheduling.policies import (
    check_payload,
    function_path,
    jitter_cap_ms,
    resolve_function,
    runnable,
)
from asgi_dist.scheduling.runner import Fire, RunSettings, is_manual, run_fire
from asgi_dist.scheduling.schedules import (
    MAX_PERIOD,
    CronSchedule,
    OnceSchedule,
    Schedule,
    interval,
    period_after,
    to_ms,
    utc,
)
from asgi_dist.scheduling.store import Claim, SchedulerStore
from asgi_dist.scheduling.store_memory import MemoryStore
from asgi_dist.scheduling.store_redis import RedisStore

__all__ = ["Scheduler", "SchedulerConfig"]

log = logging.getLogger("asgi_dist.scheduling")

_stray: set[asyncio.Task[None]] = set()
_MAX_SLEEP = 5.0  # the leader re-reads the server clock (and its term) at least this often
# Bound on waiting for the recovery task at the end of a term (it then ends by itself).
_RECOVERY_EXIT = 5.0
_PRUNE_EVERY = 600.0  # the leader forgets dead nodes' consumer names this often...
_CONSUMER_GONE_MS = 3_600_000  # ...once idle an hour with nothing pending


class _Term(Protocol):
    fence: int
    lost: asyncio.Event


class _StaleTerm(Exception):
    """A newer leader term has claimed: this process must stop acting as leader."""


class Scheduler:
    """Registers jobs, campaigns for leadership, and claims and runs fires."""

    def __init__(self, runtime: Runtime, config: SchedulerConfig, locks: LockService) -> None:
        if not isinstance(config, SchedulerConfig):
            raise ConfigError(f"scheduler={config!r} must be a SchedulerConfig")
        self.runtime = runtime
        self.config = config
        self.locks = locks
        self.registry = Registry()
        self._store: SchedulerStore | None = None
        self._campaign: asyncio.Task[Any] | None = None
        self._runs: dict[str, tuple[str, asyncio.Task[str]]] = {}  # fire_id -> (job, task)
        self._next: dict[str, int | None] = {}
        self._tracked: set[str] = set()  # jobs whose run leases the leader reaps
        self._dispatcher: Dispatcher | None = None
        self._workers: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._started = False
        self.leading = False
        self.fence = 0
        self.terms = 0

    # registration --------------------------------------------------------------

    def cron(
        self,
        expression: str,
        *,
        name: str | None = None,
        tz: str = "UTC",
        overlap: Overlap = "allow",
        retries: int = 0,
        timeout: float | None = None,
        after: Sequence[str] | str | None = None,
        broadcast: bool = False,
        run_on: RunOn = "leader",
        misfire: Misfire = "run_once",
        misfire_grace: float = 1.0,
        jitter: float = 0.0,
    ) -> Callable[[JobFunc], JobFunc]:
        """Decorate ``async def job(ctx)`` to run on a cron schedule (5 fields, or 6 with
        seconds first) in time zone ``tz``; see :class:`JobOptions` for the options."""
        schedule = CronSchedule(expression, tz)
        options = JobOptions(
            overlap, retries, timeout, as_tuple(after), broadcast, run_on, misfire,
            misfire_grace, jitter,
        )  # fmt: skip
        return self._decorator(schedule, options, name)

    def every(
        self,
        seconds: float | None = None,
        *,
        minutes: float = 0,
        hours: float = 0,
        offset: float = 0.0,
        name: str | None = None,
        overlap: Overlap = "allow",
        retries: int = 0,
        timeout: float | None = None,
        after: Sequence[str] | str | None = None,
        broadcast: bool = False,
        run_on: RunOn = "leader",
        misfire: Misfire = "run_once",
        misfire_grace: float = 1.0,
        jitter: float = 0.0,
    ) -> Callable[[JobFunc], JobFunc]:
        """Decorate ``async def job(ctx)`` to run every ``seconds`` (+ minutes, hours),
        aligned to the UNIX epoch plus ``offset`` so every node names the same fires."""
        for label, value in (("seconds", seconds), ("minutes", minutes), ("hours", hours)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value < math.inf
            ):
                raise ConfigError(f"every({label}={value!r}) must be a finite number >= 0")
        total = (seconds or 0) + minutes * 60 + hours * 3600
        schedule = interval(total, offset=offset)
        options = JobOptions(
            overlap, retries, timeout, as_tuple(after), broadcast, run_on, misfire,
            misfire_grace, jitter,
        )  # fmt: skip
        return self._decorator(schedule, options, name)

    def add_job(
        self, func: JobFunc, schedule: Schedule, options: JobOptions, name: str | None = None
    ) -> Job:
        """Register ``func``; the decorators call this.  Refused once the scheduler runs."""
        job_name = validate_job_name(default_name(func) if name is None else name)
        check_function(func, job_name)
        options.validate(job_name)
        if (options.broadcast or options.run_on == "any") and self._backend() == "postgres":
            raise ConfigError(
                f"job {job_name!r}: broadcast=True and run_on='any' hand fires over through "
                "Redis Streams: configure Dist(redis=...) or use run_on='leader'"
            )
        if options.broadcast and options.overlap != "allow":
            raise ConfigError(
                f"job {job_name!r}: overlap={options.overlap!r} cannot apply to broadcast "
                "shards; use overlap='allow' and make each shard's work idempotent"
            )
        if self._started:
            raise ConfigError(
                f"job {job_name!r} was registered after the scheduler started: register jobs "
                "at import time, before the app starts (use scheduler.at() for one-offs)"
            )
        job = Job(job_name, func, schedule, options)
        self.registry.add(job)
        return job

    def _decorator(
        self, schedule: Schedule, options: JobOptions, name: str | None
    ) -> Callable[[JobFunc], JobFunc]:
        def decorate(func: JobFunc) -> JobFunc:
            self.add_job(func, schedule, options, name)
            return func

        return decorate

    # lifecycle -----------------------------------------------------------------

    def _backend(self) -> Literal["redis", "postgres", "memory"]:
        if self.config.backend is not None:
            return self.config.backend
        default = self.runtime.default_backend
        return "memory" if default == "zookeeper" else default

    def register(self) -> None:
        if self._backend() == "postgres":
            from asgi_dist.scheduling.store_postgres import MIGRATIONS

            self.runtime.require_postgres("the scheduler").register_migrations(
                "scheduling", MIGRATIONS
            )

    def _make_store(self) -> SchedulerStore:
        backend = self._backend()
        cap = self.config.history_limit
        if backend == "redis":
            from asgi_dist.scheduling.store_redis import RedisStore

            redis = self.runtime.require_redis("the scheduler")
            return RedisStore(redis, self.runtime.pubsub, history_cap=cap)
        if backend == "postgres":
            from asgi_dist.scheduling.store_postgres import PostgresStore

            store: SchedulerStore = PostgresStore(
                self.runtime.require_postgres("the scheduler"), history_cap=cap
            )
            return store
        return MemoryStore(history_cap=cap)

    @property
    def store(self) -> SchedulerStore:
        if self._store is None:
            raise SchedulerError("the scheduler is not started: start the Dist first")
        return self._store

    async def start(self) -> None:
        if self._started:
            return
        self.registry.check_dependencies()
        self._store = self._make_store()
        await self._store.start()
        self._stopping = False
        self._started = True
        # Disabled, the process still operates the cluster's jobs (trigger, pause,
        # history) but never leads or runs them.
        if self.config.enabled:
            await self._start_dispatch()
            self._campaign = self.runtime.spawn("scheduler", self._campaign_forever)

    async def _start_dispatch(self) -> None:
        jobs = list(self.registry)
        wants_any = any(j.options.run_on == "any" for j in jobs)
        wants_broadcast = any(j.options.broadcast for j in jobs)
        if self.runtime.redis is None or self._backend() != "redis":
            return  # memory: this one process is the whole cluster
        if not (wants_any or wants_broadcast):
            return  # idle followers stay silent
        store = self.store
        assert isinstance(store, RedisStore)  # the backend is redis (checked above)
        dispatcher = Dispatcher(
            self.runtime.redis, store, self.runtime.node_id, self.runtime.leader_ttl
        )
        await dispatcher.join(member=wants_broadcast)
        self._dispatcher = dispatcher
        spawn = self.runtime.spawn
        if wants_any:
            self._workers.append(
                spawn("scheduler-any", lambda: dispatcher.consume_any_forever(self._received_any))
            )
        if wants_broadcast:
            self._workers.append(spawn("scheduler-heartbeat", dispatcher.heartbeat_forever))
            self._workers.append(
                spawn(
                    "scheduler-broadcast",
                    lambda: dispatcher.consume_broadcast_forever(self._received),
                )
            )

    async def stop(self) -> None:
        """Resign at once (hand-over in milliseconds), give running jobs the grace period,
        then cancel them; each records its final status."""
        if not self._started:
            return
        self._stopping = True
        self._started = False
        if self._campaign is not None:
            if self.leading:
                # Wake the leader loop so it leaves the leadership block by itself
                # (resigning at once); cancelling it inside a pub/sub read can be
                # swallowed by the client's own read timeout.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.store.wake(), 1.0)
                await asyncio.wait({self._campaign}, timeout=2.0)
            self._campaign.cancel()
            with contextlib.suppress(BaseException):
                await self._campaign
            self._campaign = None
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        if self._dispatcher is not None:
            with contextlib.suppress(Exception):
                await self._dispatcher.leave()
            self._dispatcher = None
        runs = [task for _, task in self._runs.values()]
        if runs:
            await asyncio.wait(runs, timeout=self.config.shutdown_grace)
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
        if self._store is not None:
            await self._store.stop()

    def request_hook(self) -> RequestHook | None:
        return None

    # operations ------------------------------------------------------------------

    def _job(self, name: str) -> Job:
        job = self.registry.get(name)
        if job is None:
            raise SchedulerError(
                f"no job named {name!r} is registered here: known jobs are "
                f"{sorted(j.name for j in self.registry)}"
            )
        return job

    async def trigger(self, name: str, payload: Any = None) -> str:
        """Run ``name`` now, once, on whichever node leads; returns the fire id."""
        self._job(name)
        now = await self.store.now_ms()
        fire_id = f"{name}:{now}:trigger-{secrets.token_hex(3)}"
        check_payload(payload)
        await self.store.push_trigger(
            {"job": name, "fire_ms": now, "fire_id": fire_id, "payload": payload}
        )
        return fire_id

    async def pause(self, name: str) -> None:
        """Stop starting fires of ``name`` cluster-wide; each one is still recorded (paused)."""
        self._job(name)
        await self.store.set_paused(name, True)

    async def resume(self, name: str) -> None:
        self._job(name)
        await self.store.set_paused(name, False)

    async def history(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` fires of ``name``: fire_id, status, node, fence, attempt,
        started_at (UTC ms), duration (s), error."""
        validate_job_name(name)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise ConfigError(f"history(limit={limit!r}) must be an integer from 1 to 10000")
        return await self.store.history(name, limit)

    async def jobs(self) -> list[dict[str, Any]]:
        """Every registered job with its schedule, next fire and paused flag."""
        out = []
        for job in self.registry:
            state = await self.store.state(job.name)
            next_ms = state.next_ms
            out.append(
                {
                    "name": job.name,
                    "schedule": job.signature,
                    "next_fire": None if next_ms is None else utc(next_ms),
                    "paused": state.paused,
                    "overlap": job.options.overlap,
                    "retries": job.options.retries,
                    "after": list(job.options.after),
                    "run_on": job.options.run_on,
                }
            )
        return out

    async def at(
        self,
        when: datetime | float,
        func: JobFunc,
        *,
        name: str | None = None,
        payload: Any = None,
        retries: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 (the job's per-attempt bound)
    ) -> str:
        """Run ``func`` once at ``when`` (an aware datetime, or seconds from now by the
        server clock) on whichever node leads; returns the fire id.

        ``func`` must be a module-level async function: the leader imports it by
        its dotted path (nothing is pickled).
        """
        path = function_path(func)
        job_name = validate_job_name(default_name(func) if name is None else name)
        JobOptions(retries=retries, timeout=timeout).validate(job_name)
        check_payload(payload)
        if isinstance(when, datetime):
            if when.tzinfo is None:
                raise ConfigError(
                    f"at(when={when!r}) is naive: pass an aware datetime (e.g. tzinfo=UTC)"
                )
        elif (
            isinstance(when, bool) or not isinstance(when, int | float) or not 0 <= when < math.inf
        ):
            raise ConfigError(
                f"at(when={when!r}): pass an aware datetime or a finite number of seconds >= 0"
            )
        now = await self.store.now_ms()
        at_ms = to_ms(when) if isinstance(when, datetime) else now + round(when * 1000)
        if at_ms - now > MAX_PERIOD * 1000:
            raise ConfigError(
                f"at(when={when!r}) is more than {MAX_PERIOD:.0f} s (10 years) ahead: a "
                "one-off must fall within ten years of now"
            )
        fire_id = f"{job_name}:{at_ms}:once-{secrets.token_hex(3)}"
        entry = {
            "job": job_name,
            "func": path,
            "fire_ms": at_ms,
            "fire_id": fire_id,
            "payload": payload,
            "retries": retries,
            "timeout": timeout,
        }
        await self.store.add_once(entry, at_ms)
        return fire_id

    # leadership ------------------------------------------------------------------

    async def _campaign_forever(self) -> None:
        election = self.locks.election("scheduler", backend=self._backend())
        failures = 0
        while not self._stopping:
            try:
                async with election.leadership() as term:
                    failures = 0
                    await self._lead(term)
            except (LockLost, _StaleTerm) as exc:
                log.warning("scheduler leadership ended: %s", exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if as_backend_unavailable(exc) is None:
                    log.exception("scheduler leader loop failed")
                else:
                    log.warning("scheduler backend unavailable: %s", exc)
                failures += 1
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
            finally:
                self.leading = False

    async def _lead(self, term: _Term) -> None:
        store = self.store
        # Subscribe to wake-ups before the first pass, so a trigger queued after
        # that pass cannot sleep unnoticed until the next scheduled fire.
        await store.wait_wakeup(0)
        self.leading, self.fence = True, int(term.fence)
        self.terms += 1
        log.info("scheduler: %s leads (fence %d)", self.runtime.node_id, self.fence)
        now = await store.now_ms()
        for job in self.registry:
            state = await store.init_job(job.name, job.signature, job.schedule.next_after(now))
            self._next[job.name] = state.next_ms
        # A one-off's name is no registered job: the store names those with runs (the
        # last leader may have died running one).
        self._tracked = {j.name for j in self.registry} | set(await store.one_off_names())
        ended = asyncio.Event()
        recovery = self._start_recovery(ended)
        try:
            await self._lead_loop(term)
        finally:
            if recovery is not None:
                # A cancellation swallowed inside a client library (seen with redis-py
                # while Redis restarts under load) would leave the task looping, and an
                # unbounded wait for it would hold a term that claims nothing, for good:
                # the loop also ends on `ended`, and the wait is bounded.
                ended.set()
                recovery.cancel()
                await asyncio.wait({recovery}, timeout=_RECOVERY_EXIT)
                if not recovery.done():
                    log.warning("scheduler: the recovery task ignored its cancellation")
                    _stray.add(recovery)  # referenced until it ends at its next turn
                    recovery.add_done_callback(_stray.discard)

    async def _lead_loop(self, term: _Term) -> None:
        """Claim due fires, then sleep until the next one (or a wake-up), while leading."""
        loop = asyncio.get_running_loop()
        check_queues, last_check, next_once = True, loop.time(), None
        failures = 0
        while not self._stopping:
            if term.lost.is_set():
                # Normally the election cancels this body; checking too keeps a
                # swallowed cancellation from leaving a deposed leader looping.
                raise LockLost(f"the scheduler's term {self.fence} was lost")
            try:
                check_queues, last_check, next_once = await self._lead_pass(
                    check_queues, last_check, next_once
                )
            except Exception as exc:
                # An outage (or one stale pooled connection after a Redis restart)
                # does not end the term: the election does that, once its renewals
                # have failed for renew_deadline or the lease is gone.  Ending it on
                # the first error left a lease nobody could take until its ttl ran
                # out (it outlives a restart that keeps data) and moved the term on
                # every stray error.  Claims are fenced, so a deposed leader's
                # passes are refused by the store.
                if as_backend_unavailable(exc) is None:
                    raise
                failures += 1
                if failures == 1:
                    log.warning("scheduler leader: backend unavailable, retrying: %s", exc)
                check_queues = True
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
                continue
            if failures:
                log.warning("scheduler leader: backend answers again after %d failures", failures)
                failures = 0

    async def _lead_pass(
        self, check_queues: bool, last_check: float, next_once: int | None
    ) -> tuple[bool, float, int | None]:
        """One pass of the leader: claim what is due, then sleep until the next fire."""
        store = self.store
        loop = asyncio.get_running_loop()
        now = await store.now_ms()
        offset = now - loop.time() * 1000  # server clock minus loop clock (ms)
        # Jobs are independent: claim their due fires concurrently, so the
        # tenth job due at 12:00 is not ten round trips late.
        await asyncio.gather(*(self._fire_due(job, now) for job in self.registry))
        if check_queues or (next_once is not None and next_once <= now):
            await self._run_triggers()
            await self._run_once(now)
            next_once = await store.next_once_ms()
            last_check = loop.time()
        pending = [ms for ms in self._next.values() if ms is not None]
        if next_once is not None:
            pending.append(next_once)
        # Sleep by the loop clock to the server time of the next fire (+1 ms
        # so the claim, which checks the server clock, does not come early).
        sleep = _MAX_SLEEP
        if pending:
            sleep = (min(pending) + 1 - (loop.time() * 1000 + offset)) / 1000
        woken = False
        if sleep > 0:
            woken = await store.wait_wakeup(min(sleep, _MAX_SLEEP))
        # Triggers, one-offs and pauses announce themselves; the queues are
        # read on a wake-up, or every _MAX_SLEEP in case one was lost.
        check_queues = woken or loop.time() - last_check >= _MAX_SLEEP
        return check_queues, last_check, next_once

    def _start_recovery(self, ended: asyncio.Event) -> asyncio.Task[None] | None:
        """While leading: record the fires whose node died before they finished, and
        hand out again the run_on="any" fires that no node started.  Followers do
        neither; the memory store has no other node to lose."""
        store = self.store
        if isinstance(store, MemoryStore):
            return None
        return asyncio.create_task(self._recover_forever(store, ended), name="scheduler-recovery")

    async def _recover_forever(self, store: SchedulerStore, ended: asyncio.Event) -> None:
        config, dispatcher = self.config, self._dispatcher
        redeliver = dispatcher is not None and any(j.options.run_on == "any" for j in self.registry)
        # Half the bounds: a stuck entry waits at most 1.5 x redeliver_after, a dead
        # node's fire is recorded lost at most 1.5 x running_lease after its last renewal.
        pause = config.running_lease / 2
        if redeliver:
            pause = min(config.redeliver_after, config.running_lease) / 2
        min_idle_ms = round(config.redeliver_after * 1000)
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while not ended.is_set():
            try:
                if redeliver and dispatcher is not None:
                    if loop.time() >= next_prune:
                        next_prune = loop.time() + _PRUNE_EVERY
                        await dispatcher.prune_consumers(_CONSUMER_GONE_MS)
                    sent = await dispatcher.redeliver(min_idle_ms, config.max_deliveries)
                    if sent:
                        log.warning("scheduler: %d dispatched fire(s) handed out again", sent)
                registered = {j.name for j in self.registry}
                # Live broadcast members: a shard whose member is gone settles as lost.
                members = None
                if dispatcher is not None and any(j.options.broadcast for j in self.registry):
                    members = await dispatcher.members()
                forgotten = await store.forget_retired()
                if forgotten:
                    log.info("scheduler: forgot %d records of retired one-off names", forgotten)
                one_offs = await store.one_off_names()
                self._tracked |= set(one_offs)
                for job in sorted(self._tracked):
                    lost = await store.reap_lost(job, members=members)
                    if lost:
                        log.warning("scheduler: fires lost with their node: %s", lost)
                    if job not in registered and not await store.has_runs(job):
                        # A one-off's name, all of its runs over: nothing left to
                        # reap (names given to at() may be countless).
                        self._tracked.discard(job)
                        if job in one_offs:
                            await store.untrack_one_off(job, one_offs[job])
            except Exception as exc:
                log.warning("scheduler recovery pass failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), pause)

    async def _fire_due(self, job: Job, now: int) -> None:
        """Claim every fire of ``job`` due at ``now``, deciding late ones by the misfire policy."""
        first = self._next.get(job.name)
        if first is None or first > now:
            return
        fires: list[int] = []
        following: int | None = first
        while following is not None and following <= now and len(fires) < self.config.max_catchup:
            fires.append(following)
            following = job.schedule.next_after(following)
        run = runnable(job, fires, now, following, self.config.run_all_limit)
        for index, fire_ms in enumerate(fires):
            after = fires[index + 1] if index + 1 < len(fires) else following
            if not await self._claim_and_launch(job, fire_ms, after, fire_ms in run):
                return

    async def _claim_and_launch(
        self, job: Job, fire_ms: int, following: int | None, run: bool
    ) -> bool:
        """Claim one fire of the sequence; False when the loop must re-read the state."""
        fire_id = f"{job.name}:{fire_ms}"
        claim = Claim(
            job=job.name,
            fire_ms=fire_ms,
            fire_id=fire_id,
            expected_next=fire_ms,
            new_next=following,
            advance=True,
            fence=self.fence,
            intent="run" if run else "missed",
            record=self._record(job.name, fire_id, fire_ms, "schedule"),
            overlap=job.options.overlap,
            lease_ms=round(self.config.running_lease * 1000),
            claim_ttl_ms=self._claim_ttl(job.schedule, fire_ms),
            signature=job.signature,
        )
        if not run:
            claim.record["error"] = (
                f"missed: {job.options.misfire} policy, more than "
                f"{job.options.misfire_grace:g}s late when a leader could claim it"
            )
        result = await self.store.claim(claim)
        if result.status == "stale":
            raise _StaleTerm(f"fence {self.fence} is older than {result.detail}")
        if result.status == "early":
            return False  # the loop re-reads the server clock and sleeps the rest
        if result.status == "moved":
            # Another leader advanced the sequence, a deployment changed the
            # schedule, or the state was lost (e.g. a flushed Redis): re-read it,
            # restarting the sequence only if our signature is not the stored one.
            now = await self.store.now_ms()
            state = await self.store.init_job(job.name, job.signature, job.schedule.next_after(now))
            self._next[job.name] = state.next_ms
            return False
        self._next[job.name] = following
        if result.status == "claimed":
            await self._hand_over(job, fire_ms, fire_id, None)
        return True

    def _claim_ttl(self, schedule: Schedule, fire_ms: int) -> int:
        period = period_after(schedule, fire_ms) or 0
        # Outlives two periods plus a minute of clock skew between leaders.
        return max(round(self.config.claim_ttl * 1000), 2 * period + 60_000)

    def _record(self, job: str, fire_id: str, fire_ms: int, kind: str) -> dict[str, Any]:
        return {
            "fire_id": fire_id,
            "job": job,
            "fire_ms": fire_ms,
            "kind": kind,
            "node": self.runtime.node_id,
            "fence": self.fence,
            "attempt": 0,
            "error": None,
        }

    async def _hand_over(self, job: Job, fire_ms: int, fire_id: str, payload: Any) -> None:
        """Run a claimed fire here, or hand it to the cluster (run_on="any", broadcast)."""
        dispatcher = self._dispatcher
        if dispatcher is None or not (job.options.broadcast or job.options.run_on == "any"):
            self._launch(job, fire_ms, fire_id, payload)
            return
        entry: dict[str, Any] = {
            "job": job.name,
            "fire_ms": fire_ms,
            "fire_id": fire_id,
            "fence": self.fence,
            "payload": payload,
        }
        if job.options.broadcast:
            members = await dispatcher.members() or [self.runtime.node_id]
            entry["members"] = members
            patch = {"status": "dispatched", "shard_total": len(members), "members": members}
            if not await self.store.finish(job.name, fire_id, patch, release=False):
                # Recorded lost while this leader was frozen after the claim: it is
                # never started, on any shard.
                log.warning("broadcast fire %s was lost before its hand-over", fire_id)
                return
            await dispatcher.send_broadcast(entry)
        else:
            # On the stream first, then "dispatched" by a compare-and-set that loses
            # to a node that already started it; a leader that dies in between
            # leaves "claimed", which a receiver starts just the same.
            await dispatcher.send_any(entry)
            await dispatcher.mark_dispatched(job.name, fire_id)

    async def _received_any(self, message_id: str, entry: dict[str, Any]) -> None:
        """A run_on="any" fire delivered to this node (perhaps again, perhaps late)."""
        dispatcher = self._dispatcher
        job = self.registry.get(str(entry.get("job")))
        if dispatcher is None or job is None or job.options.run_on != "any":
            # Left unacknowledged: the leader hands it to another node, and records
            # it abandoned after max_deliveries (a deployment that differs by node).
            log.error("dispatched fire %s names no run_on='any' job here", entry.get("fire_id"))
            return
        fire_id = str(entry["fire_id"])
        lease_ms = round(self.config.running_lease * 1000)
        outcome = await dispatcher.start_fire(job.name, fire_id, lease_ms, entry["delivery"])
        # Acknowledged after the compare-and-set, whichever way it went: either this
        # node starts the fire, or another one did (or it ended) and it must not start.
        await dispatcher.ack(message_id)
        if outcome != "running":
            log.info("fire %s not started here: it is %s", fire_id, outcome)
            return
        self._launch(job, entry["fire_ms"], fire_id, entry.get("payload"), fence=entry["fence"])

    async def _received(self, entry: dict[str, Any]) -> None:
        """A broadcast fire handed over by the leader (every node, the leader included)."""
        job = self.registry.get(str(entry.get("job")))
        dispatcher = self._dispatcher
        if job is None or not job.options.broadcast or dispatcher is None:
            log.error("dispatched fire %s names no broadcast job here", entry.get("fire_id"))
            return
        members = [str(m) for m in entry.get("members", [])]
        if self.runtime.node_id not in members:
            return  # joined after the fire was sharded
        shard, total = members.index(self.runtime.node_id), len(members)
        fire_id = str(entry["fire_id"])
        # Recorded lost (this node's heartbeat lapsed: it froze) or abandoned (read too
        # late) by the leader meanwhile: the shard must not start.
        outcome = await dispatcher.start_shard(job.name, fire_id, shard)
        if outcome != "running":
            log.warning("shard %d of fire %s not started here: %s", shard, fire_id, outcome)
            return
        self._launch(
            job,
            int(entry["fire_ms"]),
            str(entry["fire_id"]),
            entry.get("payload"),
            fence=int(entry["fence"]),
            shard=(shard, total),
        )

    def _launch(
        self,
        job: Job,
        fire_ms: int,
        fire_id: str,
        payload: Any,
        *,
        fence: int | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if job.options.overlap == "replace":
            # A run of the same job in this process gives way at once; runs on
            # other nodes notice at their next lease renewal.
            for other_key, (other_job, task) in list(self._runs.items()):
                if other_job == job.name and not other_key.startswith(f"{fire_id}#"):
                    task.cancel()
        jitter_ms = jitter_cap_ms(job, fire_ms)
        # Run by hand (trigger) or once (at): no parent has a fire to wait for.
        blocked = None if is_manual(fire_id) else self._parents_without_fire(job, fire_ms)
        lease_ms = round(self.config.running_lease * 1000)
        fire = Fire(
            job=job,
            fire_ms=fire_ms,
            fire_id=fire_id,
            fence=self.fence if fence is None else fence,
            shard_index=shard[0],
            shard_total=shard[1],
            broadcast=job.options.broadcast,
            node_id=self.runtime.node_id,
            leased=job.options.overlap != "allow",
            payload=payload,
            blocked=blocked,
            jitter_cap_ms=jitter_ms,
            keepalive=self._keepalive(job, fire_id, lease_ms),
        )
        settings = RunSettings(
            lease_ms=lease_ms,
            backoff_base=self.config.retry_backoff,
            backoff_max=self.config.retry_backoff_max,
            dependency_wait=self.config.dependency_wait,
        )
        task = asyncio.create_task(run_fire(self.store, fire, settings), name=f"job:{fire_id}")
        run_key = f"{fire_id}#{shard[0]}"
        self._runs[run_key] = (job.name, task)
        task.add_done_callback(lambda _: self._runs.pop(run_key, None))

    def _keepalive(
        self, job: Job, fire_id: str, lease_ms: int
    ) -> Callable[[int | None], Awaitable[bool]] | None:
        """Renews the run lease taken at the claim (or at the start of a handed-over
        fire), and records each attempt's start; not for broadcast shards (one fire,
        many runs)."""
        store, node = self.store, self.runtime.node_id
        if isinstance(store, MemoryStore) or job.options.broadcast:
            return None

        async def keepalive(attempt: int | None) -> bool:
            return await store.keep_running(job.name, fire_id, lease_ms, attempt=attempt, node=node)

        return keepalive

    def _parents_without_fire(self, job: Job, fire_ms: int) -> str | None:
        """Why the fire cannot follow its parents (one has no fire at this time), or None."""
        for parent in job.options.after:
            parent_job = self.registry.get(parent)
            if parent_job is None or parent_job.schedule.next_after(fire_ms - 1) != fire_ms:
                return f"parent {parent!r} has no fire at {utc(fire_ms).isoformat()}"
        return None

    async def _run_triggers(self) -> None:
        # Dropped from the queue only once claimed: a leader that fails in between
        # (the store unreachable for a moment, a crash) leaves the trigger to the
        # next pass or leader, whose claim of the same fire id is then a duplicate.
        for entry in await self.store.due_triggers(100):
            job = self.registry.get(str(entry.get("job")))
            try:
                int(entry["fire_ms"]), str(entry["fire_id"])
            except (KeyError, TypeError, ValueError):
                # Dropped, not retried: it would fail every leader pass for good.
                log.error("malformed trigger %r dropped", entry)
                await self.store.drop_trigger(entry)
                continue
            if job is None:
                # Triggered on a node whose deployment has a job this leader lacks:
                # every fire not run is recorded, this one too.
                error = (
                    f"job {entry.get('job')!r} is not registered on leader "
                    f"{self.runtime.node_id}: deploy the same jobs on every node"
                )
                log.error("trigger %s: %s", entry.get("fire_id"), error)
                await self._record_unrunnable(entry, error, "trigger")
            else:
                await self._claim_extra(job, entry, "trigger")
            await self.store.drop_trigger(entry)

    async def _run_once(self, now: int) -> None:
        for entry in await self.store.due_once(now, 100):
            try:
                func = resolve_function(str(entry["func"]))
                options = JobOptions(retries=int(entry["retries"]), timeout=entry["timeout"])
                job = Job(str(entry["job"]), func, OnceSchedule(int(entry["fire_ms"])), options)
            except Exception as exc:
                # Every fire not run is recorded in history: a deployment whose leader
                # lacks the function (or another version of it) says so there.
                error = (
                    f"one-off {entry.get('func')!r} cannot run on leader "
                    f"{self.runtime.node_id}: {type(exc).__name__}: {exc}; deploy the module "
                    "that defines it on every node"
                )
                log.error("one-off %s: %s", entry.get("fire_id"), error)
                await self._record_unrunnable(entry, error, "once")
                await self.store.drop_once(entry)
                continue
            await self._claim_extra(job, entry, "once")
            await self.store.drop_once(entry)

    async def _record_unrunnable(self, entry: dict[str, Any], error: str, kind: str) -> None:
        """Record a queued fire that cannot start as ``failed`` (claimed, so recorded once)."""
        try:
            job_name = validate_job_name(entry["job"])
            fire_ms, fire_id = int(entry["fire_ms"]), str(entry["fire_id"])
        except (KeyError, TypeError, ValueError, ConfigError):
            return  # not even a job to file it under (logged by the caller)
        claim = self._extra_claim(job_name, fire_ms, fire_id, kind, "allow", "failed")
        claim.record["error"] = error[:2000]
        result = await self.store.claim(claim)
        if result.status == "stale":
            raise _StaleTerm(f"fence {self.fence} is older than {result.detail}")

    async def _claim_extra(self, job: Job, entry: dict[str, Any], kind: str) -> None:
        """Claim a fire outside the job's sequence (manual trigger or one-off)."""
        fire_ms, fire_id = int(entry["fire_ms"]), str(entry["fire_id"])
        overlap = job.options.overlap if kind == "trigger" else "allow"
        claim = self._extra_claim(job.name, fire_ms, fire_id, kind, overlap, "run")
        if claim.retain_ms:
            # No job by this name: a leader that follows must learn it to reap its fire.
            await self.store.track_one_off(job.name)
        result = await self.store.claim(claim)
        if result.status == "stale":
            raise _StaleTerm(f"fence {self.fence} is older than {result.detail}")
        if result.status == "claimed":
            self._tracked.add(job.name)  # a one-off's name is no registered job
            await self._hand_over(job, fire_ms, fire_id, entry.get("payload"))

    def _retain_ms(self, job: str) -> int:
        """How long the store keeps a one-off's name after its runs: for good if a job
        is registered under it, else ``one_off_retention`` (distinct names would
        otherwise grow the store for good)."""
        return 0 if job in self.registry else round(self.config.one_off_retention * 1000)

    def _extra_claim(
        self,
        job: str,
        fire_ms: int,
        fire_id: str,
        kind: str,
        overlap: str,
        intent: Literal["run", "failed"],
    ) -> Claim:
        return Claim(
            job=job,
            fire_ms=fire_ms,
            fire_id=fire_id,
            expected_next=None,
            new_next=None,
            advance=False,
            fence=self.fence,
            intent=intent,
            record=self._record(job, fire_id, fire_ms, kind),
            overlap=overlap,
            lease_ms=round(self.config.running_lease * 1000),
            # At least 1 ms: claim_ttl=0 is valid, and Redis refuses a zero PX.
            claim_ttl_ms=max(1, round(self.config.claim_ttl * 1000)),
            signature="",
            retain_ms=self._retain_ms(job) if kind == "once" else 0,
        )
