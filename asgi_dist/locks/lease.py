"""Held leases: the handle a caller gets, the watchdog that renews them, and the
wait-and-retry loop that acquires them.

Three rules close the races of naive locks:

* every acquisition has its own random token, so a handle never releases a
  lease that expired and went to someone else, and a cancelled attempt can be
  undone by token without touching the next holder's lease;
* a waiter registers for wake-ups *before* its next attempt and sleeps at most
  the holder's remaining lease, so it neither misses a release nor polls;
* cleanup that must happen (release, undoing a cancelled attempt) runs in its
  own task behind :func:`asyncio.shield`, so the caller's cancellation cannot
  cut it in half.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from asgi_dist._checks import lease_ttl
from asgi_dist.backends import as_backend_unavailable
from asgi_dist.errors import (
    BackendUnavailable,
    ConfigError,
    LockLost,
    LockNotOwned,
    LockTimeout,
)
from asgi_dist.locks.backend import Attempt, LeaseBackend, Renewal, Watch

__all__ = ["Held", "Watchdog", "acquire_lease", "new_token", "shielded"]

log = logging.getLogger("asgi_dist.locks")

# How often the body of a lost lease is cancelled again until it exits.
_CHASE_EVERY = 0.05

# How long the watchdog task stays on its timer once no lease is left to renew.
_IDLE_LINGER = 1.0

# The shortest sleep between two attempts of one waiter: a holder reported as
# expiring "now" must not turn the wait into a busy loop.
_MIN_WAIT = 0.002

# One attempt gets the caller's remaining timeout, and at least this (timeout=0
# still needs its round trip); a backend that does not answer by then is
# unavailable, not slow.
_ATTEMPT_FLOOR = 1.0

# How long a caller waits for a cleanup that must happen (undoing an attempt,
# leaving the queue) before leaving it to finish on its own: a frozen backend
# must not hold a cancelled or timed-out caller hostage.
_CLEANUP_WAIT = 1.0


def new_token(owner: str) -> str:
    """A token unique to one acquisition, naming its node for ``leader()``."""
    return f"{secrets.token_hex(10)}@{owner}"


_background: set[asyncio.Task[Any]] = set()


async def _clean_up(
    factory: Callable[[], Awaitable[Any]], what: str, *, patient: bool = True
) -> None:
    """``shielded(factory)``, waited for at most ``_CLEANUP_WAIT`` (not at all unless
    ``patient``: the backend just failed to answer); errors logged."""
    try:
        async with asyncio.timeout(_CLEANUP_WAIT if patient else 0):
            await shielded(factory)
    except TimeoutError:
        log.debug("%s: still running, left to finish in the background", what)
    except Exception:
        log.debug("could not %s", what, exc_info=True)


async def shielded(factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``factory()`` to completion even if the caller is cancelled meanwhile.

    The work runs in its own task; a cancelled caller stops waiting for it but
    the task still finishes (and is kept referenced until it does).
    """

    async def run() -> Any:
        return await factory()

    task = asyncio.ensure_future(run())
    _background.add(task)
    task.add_done_callback(_settled)
    return await asyncio.shield(task)


def _settled(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # Retrieved: a caller that stopped waiting (cancelled, timed out) already
        # answered for it, and asyncio would log it as "never retrieved".
        log.debug("a shielded cleanup failed after its caller left: %r", task.exception())


class Held:
    """One acquisition of a lock (or one leadership term).

    ``fence`` increases strictly with every grant of the name; ``lost`` is set
    when the lease ended without ``release()`` (it expired or was taken over).
    Used as ``async with``, the body is cancelled when the lease is lost and
    :class:`~asgi_dist.LockLost` is raised from the block.
    """

    def __init__(
        self,
        *,
        backend: LeaseBackend,
        kind: str,
        name: str,
        token: str,
        fence: int,
        ttl: float,
        renew_every: float,
        renew_deadline: float,
        watchdog: Watchdog | None,
        renewed_at: float | None = None,
    ) -> None:
        self.backend = backend
        self.kind = kind
        self.name = name
        self.token = token
        self.fence = fence
        self.ttl = ttl
        self.renew_every = renew_every
        self.renew_deadline = renew_deadline
        self.lost = asyncio.Event()
        self.released = False
        # Reentrant acquisitions by the owning task nest on one lease.
        self.depth = 1
        self.owner_task: asyncio.Task[Any] | None = asyncio.current_task()
        self.lost_reason = ""
        self.lost_in_outage = False
        # The last time (loop time) a renewal that succeeded was *sent*: the
        # server's expiry is at least this plus ttl.  A lease handed on within
        # the process keeps its predecessor's.
        self.renewed_at = asyncio.get_running_loop().time() if renewed_at is None else renewed_at
        self.next_renewal = self.renewed_at + renew_every
        self._watchdog = watchdog
        self._body: asyncio.Task[Any] | None = None
        self._cancelled_body = False
        # How many times the watchdog cancelled the body: each must be undone
        # (Task.uncancel) before we can tell our cancellation from another's.
        self._cancels = 0
        self._on_end: list[Callable[[Held], None]] = []
        if watchdog is not None:
            watchdog.add(self)

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else "released" if self.released else "held"
        return f"<{type(self).__name__} {self.kind}:{self.name} fence={self.fence} {state}>"

    @property
    def owner(self) -> str:
        """The node id of the process holding it."""
        return self.token.partition("@")[2]

    def on_end(self, callback: Callable[[Held], None]) -> None:
        self._on_end.append(callback)

    async def extend(self, ttl: float | None = None) -> None:
        """Reset the lease to ``ttl`` (default: the original ttl) from now."""
        new_ttl = self.ttl if ttl is None else lease_ttl(ttl, "extend(ttl)")
        self._check_owned("extend")
        sent = asyncio.get_running_loop().time()
        if not await self.backend.renew(self.kind, self.name, self.token, new_ttl):
            self.mark_lost("extend() found the lease expired or taken over")
            raise LockNotOwned(
                f"{self.kind} {self.name!r} (fence {self.fence}) is no longer held by this "
                "handle: it expired or was taken over; acquire it again"
            )
        self.ttl = new_ttl
        self.renewed_at = sent
        self.next_renewal = sent + self.renew_every

    async def release(self) -> None:
        """Give the lease back and wake waiters; completes even if the caller is cancelled.

        Releasing twice is a no-op; releasing a lease that was lost raises
        :class:`~asgi_dist.LockNotOwned`.
        """
        if self.released:
            return
        if self.depth > 1:
            self.depth -= 1  # an inner reentrant acquisition: the lease stays
            return
        if self.lost.is_set():
            self._end()
            raise LockNotOwned(
                f"{self.kind} {self.name!r} (fence {self.fence}) was lost before release(): "
                f"{self.lost_reason}"
            )
        self.released = True
        self._end()
        target = _handoff_target(self.backend, self.kind, self.name)
        try:
            # A cancelled caller still gives the lease back: an offer or a release
            # already sent completes without anyone awaiting it (its reply is
            # handled as it is read), so the future is awaited as it is.
            if target is not None:
                owned = await target.offer(self)
            else:
                soon = getattr(self.backend, "release_soon", None)
                if soon is not None:
                    owned = await soon(self.kind, self.name, self.token)
                else:
                    owned = await shielded(
                        lambda: self.backend.release(self.kind, self.name, self.token)
                    )
        except Exception as exc:
            outage = as_backend_unavailable(exc)
            if outage is None:
                raise
            raise BackendUnavailable(
                f"could not release {self.kind} {self.name!r} (fence {self.fence}): {outage}; "
                f"it ends by its ttl ({self.ttl:g}s) at the latest, as nothing renews it",
                retry_after=outage.retry_after,
            ) from exc
        finally:
            _holder_left(self)
        if not owned:
            self.lost_reason = "the lease had expired before release()"
            self.lost.set()
            raise LockNotOwned(
                f"{self.kind} {self.name!r} (fence {self.fence}) had expired before release(): "
                "the critical section outlived its ttl; renewals were not possible"
            )

    def mark_lost(self, reason: str, *, outage: bool = False) -> None:
        """The lease is gone: tell the holder, cancel the body, stop renewing."""
        if self.lost.is_set() or self.released:
            return
        self.lost_reason = reason
        self.lost_in_outage = outage
        self.lost.set()
        _holder_left(self)
        self._end()
        log.warning("%s %r (fence %d) lost: %s", self.kind, self.name, self.fence, reason)
        self.cancel_body()

    def cancel_body(self) -> bool:
        """Cancel the body of a lost lease (again); False once it has exited.

        The watchdog calls it on every tick until the body leaves: a client
        library that swallows a cancellation landing inside its own call
        (redis-py 8 does, for some) must not let the body run on unfenced.
        """
        body = self._body
        if body is None or body.done() or not self.lost.is_set():
            return False
        self._cancelled_body = True
        self._cancels += 1
        body.cancel(f"asgi_dist: {self.kind} {self.name!r} lost: {self.lost_reason}")
        if self._watchdog is not None:
            self._watchdog.chase(self)
        return True

    def detach_body(self) -> bool:
        """Stop cancelling the body and undo our cancellations.

        True when the body was cancelled because the lease was lost and nobody
        else has asked for its cancellation: the ``CancelledError`` it sees is
        ours, to be turned into :class:`~asgi_dist.LockLost`.
        """
        body, self._body = self._body, None
        if not self._cancelled_body or body is None:
            return False
        cancels, self._cancels = self._cancels, 0
        pending = body.cancelling()
        for _ in range(min(cancels, pending)):
            pending = body.uncancel()
        return pending == 0

    def _end(self) -> None:
        if self._watchdog is not None:
            self._watchdog.discard(self)
        callbacks, self._on_end = self._on_end, []
        for callback in callbacks:
            callback(self)

    def _check_owned(self, what: str) -> None:
        if self.released or self.lost.is_set():
            raise LockNotOwned(
                f"{what}() on {self.kind} {self.name!r} (fence {self.fence}) which is "
                f"{'released' if self.released else 'lost'}"
            )

    # async with: the body is cancelled when the lease is lost -------------------

    def bind_body(self, task: asyncio.Task[Any] | None) -> None:
        if self._body is None:
            self._body = task

    def reenter(self) -> Held:
        """One more nested acquisition by the owning task."""
        self._check_owned("reentrant acquire")
        self.depth += 1
        return self

    async def exit_body(self, exc: BaseException | None) -> None:
        """Release, and turn the watchdog's cancellation of the body into LockLost."""
        if self.depth > 1 and not self.lost.is_set():
            self.depth -= 1
            return
        if self._cancelled_body and self._body is not None:
            body = self._body
            if not isinstance(exc, asyncio.CancelledError):
                # The body ended before our cancellation landed: consume it here
                # so it does not hit the caller's next await.
                self._body = None  # stop the watchdog re-cancelling meanwhile
                try:
                    if body.cancelling():
                        await asyncio.sleep(0)
                except asyncio.CancelledError:
                    pass
                self._body = body
            if self.detach_body():
                raise LockLost(
                    f"{self.kind} {self.name!r} (fence {self.fence}) was lost while held "
                    f"({self.lost_reason}); the body was cancelled. Keep critical sections "
                    "shorter than the ttl, or check the fence where the work is written",
                    outage=self.lost_in_outage,
                ) from exc
            return  # someone else cancelled us too: let CancelledError propagate
        self._body = None
        if self.lost.is_set():
            if exc is None:
                raise LockLost(
                    f"{self.kind} {self.name!r} (fence {self.fence}) was lost while held: "
                    f"{self.lost_reason}",
                    outage=self.lost_in_outage,
                )
            return
        try:
            await self.release()
        except LockNotOwned:
            if exc is None:
                raise

    async def __aenter__(self) -> Held:
        self.bind_body(asyncio.current_task())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.exit_body(exc)


class Watchdog:
    """Renews every lease of one service, batched per backend and tick.

    Each lease is renewed every ``renew_every`` seconds; a failed renewal is
    retried until ``renew_deadline`` after the last success, then the lease is
    declared lost (before the server can expire it, since the deadline is
    shorter than the ttl).  A renewal the server refuses means the lease is
    already gone.
    """

    def __init__(self, spawn: Callable[[str, Callable[[], Any]], asyncio.Task[Any]]) -> None:
        self._spawn = spawn
        self._held: set[Held] = set()
        # Bodies of lost leases still running: cancelled again every tick.
        self._chased: set[Held] = set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        # When the sleeping task will next look (loop time; inf while idle): a
        # lease due no sooner needs no wake-up, which would cost every
        # acquisition a turn of the loop.
        self._wake_at = math.inf
        self.ticks = 0
        # Between the Dist's start and stop: no lease may be taken outside it,
        # where nothing would renew it, or give it back at stop.
        self.running = False

    def on_start(self) -> None:
        """The Dist starts, maybe on another event loop than last time (two
        ``TestClient`` blocks in a row): an Event bound to the old one would
        crash the task, and leases would expire unrenewed."""
        self._changed = asyncio.Event()
        self._task = None
        self._wake_at = math.inf
        self.running = True

    def check_running(self, kind: str, name: str) -> None:
        if not self.running:
            raise ConfigError(
                f"cannot acquire {kind} {name!r}: the Dist is not started (or was stopped); "
                "use 'async with dist:' in a script, dist.wrap(app) in an ASGI app (it "
                "starts with the lifespan), or await dist.start()"
            )

    def add(self, held: Held) -> None:
        self._held.add(held)
        if self._task is None or self._task.done():
            self._task = self._spawn("lock-watchdog", self._run)
            self._wake_at = -math.inf  # starting: it looks at every lease anyway
        if min(held.next_renewal, held.renewed_at + held.renew_deadline) < self._wake_at:
            self._changed.set()

    def discard(self, held: Held) -> None:
        self._held.discard(held)

    def chase(self, held: Held) -> None:
        if held not in self._chased:
            self._chased.add(held)
            self._changed.set()
            if self._task is None or self._task.done():
                self._task = self._spawn("lock-watchdog", self._run)

    @property
    def held(self) -> frozenset[Held]:
        return frozenset(self._held)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        idle_since: float | None = None
        while True:
            self._changed.clear()
            now = loop.time()
            if not self._held and not self._chased:
                # Nothing to renew: linger a moment before sleeping for good, so
                # that a process taking and releasing locks in a row does not wake
                # this task for each of them.
                if idle_since is None:
                    idle_since = now
                if now - idle_since >= _IDLE_LINGER:
                    self._wake_at = math.inf
                    await self._changed.wait()
                    idle_since = None
                    continue
                wake = idle_since + _IDLE_LINGER
            else:
                idle_since = None
                wake = min(
                    (min(h.next_renewal, h.renewed_at + h.renew_deadline) for h in self._held),
                    default=math.inf,
                )
                if self._chased:
                    wake = min(wake, now + _CHASE_EVERY)
            self._wake_at = wake
            delay = wake - now
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
                    continue  # a lease was added: recompute the next wake-up
                except TimeoutError:
                    pass
            try:
                await self._tick(loop.time())
            except Exception:
                # A crashed watchdog would let every lease expire unnoticed.
                log.exception("lock watchdog tick failed; retrying")
                await asyncio.sleep(0.05)

    async def _tick(self, now: float) -> None:
        self.ticks += 1
        for held in list(self._chased):
            if not held.cancel_body():
                self._chased.discard(held)
        for held in list(self._held):
            if now - held.renewed_at >= held.renew_deadline:
                held.mark_lost(
                    f"no renewal succeeded for {held.renew_deadline:g}s (backend unreachable?)",
                    outage=True,
                )
        # Coalesce: a lease due within half its period rides along with this
        # tick, so leases taken at different moments share one round trip.
        due = [h for h in self._held if h.next_renewal <= now + h.renew_every / 2]
        groups: dict[int, list[Held]] = {}
        for held in due:
            groups.setdefault(id(held.backend), []).append(held)
        if groups:
            await asyncio.gather(*(self._renew(now, group) for group in groups.values()))

    async def _renew(self, sent: float, group: list[Held]) -> None:
        backend = group[0].backend
        batch = [Renewal(h.kind, h.name, h.token, h.ttl) for h in group]
        bound = max(0.05, min(h.renewed_at + h.renew_deadline for h in group) - sent)
        results: list[bool | BaseException]
        try:
            async with asyncio.timeout(bound):
                results = await backend.renew_many(batch)
        except Exception as exc:
            results = [exc] * len(group)
        for held, result in zip(group, results, strict=True):
            if held.released or held.lost.is_set():
                continue
            if result is True:
                held.renewed_at = sent
                held.next_renewal = sent + held.renew_every
            elif result is False:
                held.mark_lost("the lease expired or was taken over before it was renewed")
            else:
                # An outage: retry soon, until the renew deadline decides.
                log.debug("renewal of %s %r failed: %r", held.kind, held.name, result)
                held.next_renewal = sent + max(0.05, held.renew_every / 3)


class _Gate:
    """A FIFO turnstile: one waiter per process and name competes at a time.

    Without it every waiting task of a process would wake on each release and
    race the others with an attempt (a thundering herd of round trips); with
    it, local waiters queue in arrival order and pass the turn on as soon as
    the current one holds the lease.  A turn passed on by a waiter that just
    acquired carries that lease's ttl: the lock is known to be held by this
    process, so the next waiter sleeps until its release instead of spending
    a round trip to learn it.
    """

    __slots__ = (
        "block",
        "busy",
        "holder",
        "local_handoffs",
        "release_rtt",
        "target",
        "users",
        "waiters",
    )

    def __init__(self) -> None:
        self.busy = False
        self.users = 0
        self.target: _Target | None = None
        self.local_handoffs = 0
        # (token, ttl) of the lease a waiter of this gate won, until released:
        # the gate outlives its waiters meanwhile, so the next local acquirer
        # queues here (and is handed the lease) instead of asking the store.
        self.holder: tuple[str, float] | None = None
        # The last hand-off's duration: a local waiter's courtesy is based on it.
        self.release_rtt = 0.001
        # Fences reserved by the last hand-off through the store, for hand-offs
        # within this process that need none (see _Block).
        self.block: _Block | None = None
        self.waiters: deque[tuple[asyncio.Future[float | None], _Target]] = deque()

    async def enter(self, bound: float | None, target: _Target) -> float | None:
        """Wait for the turn (raises TimeoutError after ``bound`` seconds).

        Returns the ttl of the lease the previous turn-holder just acquired,
        or None when nothing is known about the lease.  ``target`` is who a
        local release may hand the lease to once the turn is ours.
        """
        if not self.busy and not self.waiters:
            self.busy = True
            self.target = target
            return None if self.holder is None else self.holder[1]
        turn: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        entry = (turn, target)
        self.waiters.append(entry)
        try:
            async with asyncio.timeout(bound):
                return await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave(None)  # handed the turn while giving up: pass it on
            elif entry in self.waiters:
                # Not there if another waiter's leave() already dropped it as
                # cancelled (two giving up in one turn of the loop).
                self.waiters.remove(entry)
            raise

    def leave(self, acquired_ttl: float | None) -> None:
        while self.waiters:
            turn, target = self.waiters.popleft()
            if not turn.done():
                if acquired_ttl is not None:
                    # Releases seen while queued are stale now that this process
                    # holds the lease again; only the next release counts.  Cleared
                    # here, synchronously with the grant, so none can slip between.
                    target.event.clear()
                # Registered now, not when the waiter resumes: the new holder
                # may release before that.
                self.target = target
                turn.set_result(acquired_ttl)  # the turn moves on; busy stays True
                return
        self.target = None
        self.busy = False


_gates: dict[tuple[int, str, str], _Gate] = {}

# Lock cohorting (Dice, Marathe, Shavit, 2012): a release hands the lease to the
# waiter of the same process whose turn it is, in the release's own round trip;
# after this many in a row it releases to everyone instead if a waiter of
# another process may be listening, so that one gets its chance.
_MAX_LOCAL_HANDOFFS = 4

# A hand-off through the store also reserves fences for the process, which then
# hands the lease on among its own waiters with no round trip at all: for at
# most this long, after which the next release asks the store again (and goes
# to another process if one waits), so no process waits longer for it.
_COHORT_BLOCK = 1024
_COHORT_WINDOW = 0.02


class _Block:
    """Fences ``next``..``last`` reserved with the lease ``token`` at ``since``."""

    __slots__ = ("last", "next", "since", "token")

    def __init__(self, token: str, first: int, last: int, since: float) -> None:
        self.token = token
        self.next = first
        self.last = last
        self.since = since


class _Target:
    """The in-turn waiter of a gate, to which a local release may hand the lease."""

    __slots__ = (
        "courtesy",
        "event",
        "gate",
        "granted",
        "lease_token",
        "pending",
        "renewed_at",
        "token",
        "ttl",
    )

    def __init__(self, gate: _Gate, token: str, ttl: float, event: asyncio.Event) -> None:
        self.gate = gate
        self.token = token
        self.ttl = ttl
        self.event = event
        self.granted: int | None = None
        # The token the store knows the lease by once granted: ours, unless it
        # was handed on within the process (the first local holder's); and when
        # the store last extended it (loop time), for a local hand-off.
        self.lease_token = token
        self.renewed_at: float | None = None
        # After a release to everyone: how long this waiter lets the waiters of
        # other processes try first.
        self.courtesy = 0.0
        # The hand-off in flight, awaited by a waiter that gives up meanwhile.
        self.pending: asyncio.Future[Any] | None = None

    def offer(self, held: Held) -> asyncio.Future[bool]:
        """Release ``held`` to this waiter (or to everyone), already sent.

        The future says whether ``held`` still owned the lease; the release and
        its bookkeeping complete even if nobody awaits it (a cancelled releaser).
        """
        backend: Any = held.backend
        gate = self.gate
        gate.target = None  # one offer per waiter
        loop = asyncio.get_running_loop()
        pending = self.pending = loop.create_future()
        owned: asyncio.Future[bool] = loop.create_future()
        owned.add_done_callback(_retrieved)
        sent = loop.time()
        block = gate.block
        if (
            block is not None
            and block.token == held.token
            and block.next <= block.last
            and sent - block.since < _COHORT_WINDOW
            and self.ttl == held.ttl
            and not held.lost.is_set()
        ):
            # Within the process, with a fence reserved: the lease stays as the
            # store knows it (token, expiry), and only its holder changes.
            self.granted, block.next = block.next, block.next + 1
            self.lease_token = held.token
            self.renewed_at = held.renewed_at
            pending.set_result(self.granted)
            self.event.set()
            owned.set_result(True)
            return owned

        def settle(outcome: tuple[int, int] | bool | None, error: BaseException | None) -> None:
            # Runs as the reply is read: the waiter is woken in the very next turn.
            if error is not None or outcome is None:
                self.event.set()  # the waiter must look again, not sleep a ttl
                for future in (pending, owned):
                    if not future.done():
                        if error is None or isinstance(error, asyncio.CancelledError):
                            future.cancel()
                        else:
                            future.set_exception(error)
                if not pending.cancelled():
                    pending.exception()  # retrieved: the waiter may be gone
                return
            gate.release_rtt = loop.time() - sent
            if outcome is True:
                # Released to everyone: the other processes' waiters hear it
                # through pub/sub, while ours is woken at once and would win
                # every race; it lets them try first for about two round trips.
                gate.local_handoffs = 0
                self.courtesy = 2 * gate.release_rtt
            elif outcome is not False:
                gate.local_handoffs += 1
                first, last = outcome
                self.granted = first
                gate.block = _Block(self.token, first + 1, last, loop.time())
            # The releaser resumes first: if it asks again at once, it queues
            # behind the new holder, which can then hand the lease back without
            # the store.
            if not owned.done():  # cancelled with its awaiting releaser
                owned.set_result(outcome is not False)
            pending.set_result(self.granted)
            self.event.set()

        call = (held.kind, held.name, held.token, self.token, self.ttl)
        # After a run of hand-offs within the process, the store is asked whether
        # another process waits.
        options = {
            "yield_to_others": gate.local_handoffs >= _MAX_LOCAL_HANDOFFS
            or (block is not None and block.token == held.token),
            "reserve": _COHORT_BLOCK,
        }
        gate.block = None
        backend.release_to_soon(*call, settle, **options)
        return owned


def _retrieved(future: asyncio.Future[Any]) -> None:
    # Read, so that a failure nobody awaited any more is not logged as lost.
    if not future.cancelled():
        future.exception()


def _holder_left(held: Held) -> None:
    """The lease a gate's waiter won ended (released or lost): forget it."""
    key = (id(getattr(held.backend, "gate_scope", held.backend)), held.kind, held.name)
    gate = _gates.get(key)
    if gate is None or gate.holder is None or gate.holder[0] != held.token:
        return  # a later holder's: leave it
    gate.holder = None
    if gate.target is not None:
        # Our waiter sleeps on this holder's lease; if it was lost rather than
        # released, nothing else would wake it before that lease's end.
        gate.target.event.set()
    if gate.users == 0:
        del _gates[key]


def _handoff_target(backend: LeaseBackend, kind: str, name: str) -> _Target | None:
    """The waiter of this process a release may hand the lease to, if any."""
    if not getattr(backend, "hands_off", False):
        return None
    gate = _gates.get((id(getattr(backend, "gate_scope", backend)), kind, name))
    return None if gate is None else gate.target


def _timed_out(kind: str, name: str, timeout: float | None, attempt: Attempt) -> LockTimeout:
    return LockTimeout(
        f"{kind} {name!r} is held by another owner; not acquired within "
        f"{timeout:g}s (retry after about {max(attempt.remaining, 0):.1f}s)",
        name=name,
        retry_after=max(attempt.remaining, 0.0) or 1.0,
    )


async def acquire_lease(
    backend: LeaseBackend,
    kind: str,
    name: str,
    *,
    token: str,
    ttl: float,
    timeout: float | None,  # noqa: ASYNC109 (bounds waiting, not one call)
) -> Attempt:
    """Attempt, then wait for a wake-up and retry, until granted or ``timeout``.

    ``timeout=None`` waits forever, ``0`` tries once; each sleep lasts until a
    wake-up or the holder's remaining lease (or the backend's poll interval
    while it lacks push).  Raises :class:`LockTimeout`.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    watch: Watch | None = None
    attempt: Attempt | None = None
    gate: _Gate | None = None
    target: _Target | None = None
    in_turn = False
    # A caller that will wait queues its process in the store with its attempts
    # and is the waiter a release hands the lease to (a try-once caller does
    # not); only the waiter whose turn it is (see _Gate) does so, and it
    # dequeues the process when it gives up.
    register = timeout != 0 and getattr(backend, "registers_waiters", False)
    registered = False
    # Backends sharing one store in this process (memory) share the turnstile.
    gate_key = (id(getattr(backend, "gate_scope", backend)), kind, name)
    try:
        gate = _gates.get(gate_key)
        if gate is not None and (gate.busy or gate.holder or gate.waiters) and timeout != 0:
            # Tasks of this process already wait for it: queue behind them
            # instead of barging in (a releasing task would otherwise win its
            # own lock back every time).
            attempt = Attempt(False, 0, -1.0)
            gate = None
        else:
            if not register:
                gate = None  # a try-once caller takes no turn (and no count) here
            else:
                # The turn is free: take it before the attempt, which queues us.
                if gate is None:
                    gate = _gates[gate_key] = _Gate()
                gate.users += 1
                gate.busy = in_turn = True
                # Listening already (a busy lock): watch before the attempt, so
                # that a release after it reaches us and no second one is needed.
                watch = backend.watch_now(kind, name, token)  # type: ignore[attr-defined]
                registered = True
            attempt = await _attempt(
                backend, kind, name, token, ttl, register, bound=_attempt_bound(deadline)
            )
        if attempt.acquired:
            return attempt
        if deadline is not None and loop.time() >= deadline:
            raise _timed_out(kind, name, timeout, attempt)
        retry_now = False
        if watch is None:
            # Register before the next attempt: a release after it wakes us.
            try:
                async with asyncio.timeout(None if deadline is None else deadline - loop.time()):
                    watch = await backend.watch(kind, name, token)
            except TimeoutError:
                raise _timed_out(kind, name, timeout, attempt) from None
            # The lease may have been released between the attempt and the watch.
            retry_now = True
        if in_turn and gate is not None:
            target = gate.target = _Target(gate, token, ttl, watch.event)
        elif not attempt.queued:
            # Queued variants (fair, writers) keep their order in the store;
            # the others take turns locally (see _Gate).
            gate = _gates.get(gate_key)
            if gate is None:
                gate = _gates[gate_key] = _Gate()
            gate.users += 1
            target = _Target(gate, token, ttl, watch.event)
            try:
                bound = None if deadline is None else max(0.0, deadline - loop.time())
                held_here = await gate.enter(bound, target)
            except TimeoutError:
                raise _timed_out(kind, name, timeout, attempt) from None
            in_turn = True
            if held_here is not None:
                # Held by this process since our watch was cleared: wait for
                # its release, bounded by its lease, without asking the store.
                attempt = Attempt(False, 0, held_here)
                retry_now = False
        while not attempt.acquired:
            now = loop.time()
            if deadline is not None and now >= deadline:
                raise _timed_out(kind, name, timeout, attempt)
            if not retry_now:
                wait = attempt.remaining if attempt.remaining > 0 else _MIN_WAIT
                if backend.poll_interval is not None:
                    wait = min(wait, backend.poll_interval)
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if not watch.event.is_set():
                    try:
                        # asyncio.timeout, not wait_for: no extra task per wait.
                        async with asyncio.timeout(max(wait, _MIN_WAIT)):
                            await watch.event.wait()
                    except TimeoutError:
                        pass
            retry_now = False
            if target is not None and target.courtesy and target.granted is None:
                courtesy, target.courtesy = target.courtesy, 0.0
                await asyncio.sleep(courtesy)
            watch.event.clear()
            # A direct hand-off names us and carries the fence: the lease is
            # already ours, no round trip needed to learn it.
            if target is not None and target.granted is not None:
                attempt = Attempt(
                    True,
                    target.granted,
                    ttl,
                    attempt.queued,
                    token=target.lease_token,
                    renewed_at=target.renewed_at,
                )
                break
            granted: int | None = getattr(watch, "granted", None)
            if granted is not None:
                attempt = Attempt(True, granted, ttl, attempt.queued)
                break
            registered = register
            attempt = await _attempt(
                backend, kind, name, token, ttl, register, bound=_attempt_bound(deadline)
            )
        return attempt
    finally:
        won = attempt is not None and attempt.acquired
        # After an attempt the backend did not answer, cleanups are not waited for
        # (they finish when it answers): the caller's timeout stays a bound.
        patient = not isinstance(sys.exc_info()[1], BackendUnavailable)
        if watch is not None:
            watch.close()
        try:
            if target is not None:
                if gate is not None and gate.target is target:
                    gate.target = None  # no hand-off to a waiter that left
                if target.pending is not None and not won:
                    # Giving up while a release was handing us the lease: wait for
                    # its outcome, and give back a lease it granted.
                    await _abandon(backend, kind, name, target.lease_token, target.pending)
            if registered and not won:
                # Take the process off the queue (shielded), passing on a lease or
                # wake-up a release may have sent us, before the turn moves on (the
                # next local waiter queues the process again with its attempt).
                await _clean_up(
                    lambda: backend.leave(kind, name, token),  # type: ignore[attr-defined]
                    f"leave the wait for {kind} {name!r}",
                    patient=patient,
                )
        finally:
            if gate is not None:
                if in_turn:
                    # A won lease that excludes the others tells the next local
                    # waiter to sleep until its release; a shared one (a permit, a
                    # read) does not: the next waiter tries at once, for a permit
                    # the same release may have freed, or one that was free all along.
                    exclusive = won and attempt is not None and not _shared(backend)
                    if exclusive and attempt is not None:
                        gate.holder = (attempt.token or token, attempt.remaining)
                    gate.leave(attempt.remaining if exclusive and attempt is not None else None)
                gate.users -= 1
                if gate.users == 0 and gate.holder is None and _gates.get(gate_key) is gate:
                    del _gates[gate_key]
        if attempt is not None and attempt.queued and not attempt.acquired:
            # A waiter that gives up (timeout, cancellation) leaves its queue
            # entry behind; remove it, shielded, and hand on a lease granted
            # to it meanwhile.
            await _clean_up(
                lambda: backend.release(kind, name, token),
                f"dequeue from {kind} {name!r}",
                patient=patient,
            )


def _shared(backend: LeaseBackend) -> bool:
    """Whether several holders hold the backend's leases at once (semaphore, read side)."""
    return bool(getattr(backend, "shared", False))


def _attempt_bound(deadline: float | None) -> float | None:
    if deadline is None:
        return None  # waits as long as it takes: the backend's own bounds apply
    return max(deadline - asyncio.get_running_loop().time(), _ATTEMPT_FLOOR)


async def _abandon(
    backend: LeaseBackend, kind: str, name: str, token: str, pending: asyncio.Future[Any]
) -> None:
    async def settle() -> None:
        try:
            granted = await pending
        except Exception:
            return
        if granted is not None:
            await backend.release(kind, name, token)

    await _clean_up(settle, f"give back {kind} {name!r}, handed to a waiter that left")


async def _attempt(
    backend: LeaseBackend,
    kind: str,
    name: str,
    token: str,
    ttl: float,
    register: bool = False,
    *,
    bound: float | None = None,
) -> Attempt:
    """One attempt, given ``bound`` seconds (None: the backend's own bounds)."""
    timer = asyncio.timeout(bound)
    try:
        async with timer:
            if register:
                return await backend.acquire(kind, name, token, ttl, register=True)  # type: ignore[call-arg]
            return await backend.acquire(kind, name, token, ttl)
    except BaseException as exc:
        # The script may have run although its reply was lost (cancelled,
        # timed out, connection dropped): undo it by token, shielded.
        await _clean_up(
            lambda: backend.release(kind, name, token),
            f"undo an interrupted attempt on {kind} {name!r}",
            patient=not timer.expired(),
        )
        if timer.expired():
            raise BackendUnavailable(
                f"the {backend.name} backend did not answer an attempt on {kind} {name!r} within "
                f"{bound:g}s (frozen or overloaded?); retry later"
            ) from exc
        outage = as_backend_unavailable(exc)
        if outage is not None and outage is not exc:
            raise outage from exc
        raise
