"""Running one claimed fire: jitter, dependencies, running lease, attempts, history.

The claim already happened (at most one start per fire); from here on a run is
at-least-once per attempt, and every outcome lands in the fire's history record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from asgi_dist.scheduling.jobs import Job, JobContext
from asgi_dist.scheduling.schedules import utc
from asgi_dist.scheduling.store import SchedulerStore

__all__ = ["Fire", "RunSettings", "backoff", "run_fire"]

log = logging.getLogger("asgi_dist.scheduling")

# Final statuses: a child waiting on a parent stops waiting at any of them.
_TERMINAL = {"succeeded", "failed", "missed", "skipped", "paused", "cancelled"}
_TERMINAL |= {"abandoned", "lost"}  # never started by any node, or its node died


@dataclass(frozen=True)
class Fire:
    job: Job
    fire_ms: int
    fire_id: str
    fence: int
    node_id: str
    leased: bool  # overlap forbid/replace: this run holds the job's running lease
    payload: Any = None
    shard_index: int = 0
    shard_total: int = 1
    jitter_cap_ms: int = 0
    blocked: str | None = None  # why it cannot follow its parents, known before it starts
    broadcast: bool = False  # one shard of a broadcast: its outcome goes under "shards"
    # Renews the fire's run lease while it runs (if this node dies, the lease expires
    # and the leader records the fire as lost); called with an attempt number, it also
    # records the fire running that attempt.  False: the fire is no longer this node's
    # to run (recorded lost), so nothing more of it may start.
    keepalive: Callable[[int | None], Awaitable[bool]] | None = None


@dataclass(frozen=True)
class RunSettings:
    lease_ms: int
    backoff_base: float
    backoff_max: float
    dependency_wait: float


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS architecture blog, 2015)."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


async def run_fire(store: SchedulerStore, fire: Fire, settings: RunSettings) -> str:
    """Run ``fire`` to a final status, record it, and return the status."""
    job = fire.job
    started_ms = 0
    t0 = time.monotonic()
    attempt = 0
    error: str | None = None
    status = "failed"
    renewer: asyncio.Task[None] | None = None
    try:
        if fire.leased or fire.keepalive is not None:
            # From the claim on, through jitter and the wait for parents: the leases
            # were taken at the claim (or the start of a handed-over fire).
            me = asyncio.current_task()
            assert me is not None
            renewer = asyncio.create_task(_renew_leases(store, fire, settings.lease_ms, me))
        if fire.jitter_cap_ms > 0:
            await asyncio.sleep(random.uniform(0, fire.jitter_cap_ms) / 1000)
        blocked = fire.blocked or await _wait_for_parents(store, fire, settings.dependency_wait)
        if blocked is not None:
            status, error = "skipped", blocked
            return status
        # The claim (or the hand-over's compare-and-set) took the run lease just now: a
        # first attempt right after it needs no check.  After any wait (jitter,
        # parents, backoff) the node may have frozen past the lease and the fire been
        # recorded lost, so the start is checked and recorded in one step.
        waited = fire.jitter_cap_ms > 0 or _follows_parents(fire)
        for attempt in range(1, job.options.retries + 2):
            if attempt > 1:
                await asyncio.sleep(
                    backoff(attempt - 1, settings.backoff_base, settings.backoff_max)
                )
            if attempt > 1 or waited:
                try:
                    ours = await _start_attempt(fire, attempt)
                except Exception as exc:
                    error = f"attempt {attempt} not started: its run lease could not be renewed"
                    error = f"{error} ({type(exc).__name__}: {exc})"[:2000]
                    log.warning("job %s fire %s: %s", job.name, fire.fire_id, error)
                    continue
                if not ours:
                    # Recorded lost by the store (finish leaves that record alone).
                    status, error = "lost", f"attempt {attempt} not started: the fire was lost"
                    log.warning("job %s fire %s: %s", job.name, fire.fire_id, error)
                    return status
            if not started_ms:
                started_ms = int(time.time() * 1000)
                t0 = time.monotonic()
            error = await _attempt(fire, attempt)
            if error is None:
                status = "succeeded"
                break
        return status
    except asyncio.CancelledError:
        status = "cancelled"
        error = error or "cancelled (shutdown, replaced by a newer fire, or lost)"
        raise
    finally:
        if renewer is not None:
            renewer.cancel()
        patch: dict[str, Any] = {
            "status": status,
            "attempt": attempt,
            "node": fire.node_id,
            "error": error,
            "duration": round(time.monotonic() - t0, 6) if started_ms else 0.0,
        }
        if started_ms:
            patch["started_at"] = started_ms
        # Shards finish independently: each reports its own outcome, and the store
        # settles the fire's status once all have (see store.settle_shard).
        shard = (fire.shard_index, fire.shard_total) if fire.broadcast else None
        # Shielded: a cancelled run must still say so in its history.
        with contextlib.suppress(Exception):
            await asyncio.shield(
                asyncio.wait_for(
                    store.finish(job.name, fire.fire_id, patch, release=fire.leased, shard=shard),
                    5.0,
                )
            )


async def _attempt(fire: Fire, attempt: int) -> str | None:
    """Call the job once; ``None`` if it succeeded, else what went wrong."""
    job = fire.job
    ctx = JobContext(
        job=job.name,
        fire_time=utc(fire.fire_ms),
        fire_id=fire.fire_id,
        fence=fire.fence,
        attempt=attempt,
        node_id=fire.node_id,
        shard_index=fire.shard_index,
        shard_total=fire.shard_total,
        payload=fire.payload,
    )
    deadline = asyncio.timeout(job.options.timeout)  # None: unbounded
    try:
        async with deadline:
            await job.func(ctx)
    except Exception as exc:
        # Only our own deadline is the job's timeout: a TimeoutError the job raised
        # itself (a client's, a socket's) is a failure like any other, and retried.
        if isinstance(exc, TimeoutError) and deadline.expired():
            return f"attempt {attempt} timed out after {job.options.timeout:g}s"
        error = f"attempt {attempt}: {type(exc).__name__}: {exc}"[:2000]
        log.warning("job %s fire %s failed: %s", job.name, fire.fire_id, error)
        return error
    return None


async def _start_attempt(fire: Fire, attempt: int) -> bool:
    """Renew the run lease and record the fire running ``attempt``, in one round trip;
    False if the fire was lost meanwhile (it must not start)."""
    if fire.keepalive is None:
        return True  # the memory store (one process) or a broadcast shard
    return await fire.keepalive(attempt)


async def _renew_leases(
    store: SchedulerStore, fire: Fire, lease_ms: int, runner: asyncio.Task[Any]
) -> None:
    """Keep the job's running lease (overlap) and the fire's run lease (proof that its
    node lives).  If the running lease now names another fire (replace), or the fire
    was recorded lost (this node froze past its run lease), cancel this run: the
    cluster no longer counts it as running, so it must not go on."""
    leased = fire.leased
    while leased or fire.keepalive is not None:
        await asyncio.sleep(lease_ms / 3000)
        if fire.keepalive is not None:
            try:
                alive = await fire.keepalive(None)
            except Exception:
                log.warning("could not renew the run lease of %s", fire.fire_id, exc_info=True)
            else:
                if not alive:
                    log.warning(
                        "fire %s was recorded lost (its run lease lapsed): cancelling its run",
                        fire.fire_id,
                    )
                    runner.cancel()
                    return
        if not leased:
            continue
        try:
            ours = await store.renew(fire.job.name, fire.fire_id, lease_ms)
        except Exception:
            log.warning("could not renew the running lease of %s", fire.fire_id, exc_info=True)
            continue
        if not ours:
            leased = False
            if fire.job.options.overlap == "replace":
                runner.cancel()
                return


def is_manual(fire_id: str) -> bool:
    """A fire outside the job's schedule (``trigger()``, ``at()``): its id carries a
    third part (``job:ms:trigger-…``); it follows no parent fire."""
    return fire_id.rpartition(":")[2].startswith(("trigger-", "once-"))


def _follows_parents(fire: Fire) -> bool:
    return bool(fire.job.options.after) and not is_manual(fire.fire_id)


async def _wait_for_parents(store: SchedulerStore, fire: Fire, wait: float) -> str | None:
    """``None`` once every parent's run of the same fire succeeded, else why not."""
    parents = fire.job.options.after
    if not _follows_parents(fire):
        return None
    deadline = time.monotonic() + wait
    delay = 0.02
    for parent in parents:
        parent_fire = f"{parent}:{fire.fire_id.rpartition(':')[2]}"
        while True:
            record = await store.record(parent, parent_fire)
            status = None if record is None else record.get("status")
            if status == "succeeded":
                break
            if status in _TERMINAL:
                return f"parent {parent!r} fire {parent_fire} ended {status}"
            if time.monotonic() >= deadline:
                return f"parent {parent!r} fire {parent_fire} did not succeed within {wait:g}s"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
    return None
