"""Leases in ZooKeeper: the lock recipe of kazoo and Apache Curator.

Znodes of the lease ``name`` of kind ``kind`` (under ``/asgi_dist/<namespace>``)::

    <kind>/<name>/                      a container node: ZooKeeper removes it when empty
    <kind>/<name>/lease-<id>-0000000042 EPHEMERAL_SEQUENTIAL, one per contender;
                                        data = the full token, <id> = its random part

An attempt creates the contender's znode once (later attempts of the same
token reuse it) and lists the children, pipelined into one round trip: the
lowest sequence holds the lease.  Every other contender sets a watch on its
*predecessor* only, so a release wakes exactly one waiter (no herd) and a
waiter sends nothing while it waits.  Release deletes the znode.  The fence is
the znode's ``czxid``, the zxid of the transaction that created it: zxids
increase across the whole ensemble, so a later holder always has a larger
fence, even after the server removed an idle name's node and it was made again.

**ttl is the session timeout.**  An ephemeral znode lives as long as its
session, so each distinct ttl gets its own ZooKeeper session (one per process,
opened on first use) whose timeout is that ttl: a holder that dies or is cut
off loses the lock ``ttl`` seconds after the server last heard from it.  The
server clamps the timeout to its ``minSessionTimeout`` .. ``maxSessionTimeout``
(by default 4 to 40 s); outside that range the clamped value is the real one.
While the process lives, kazoo's heartbeats keep the session, so the lease
never runs out under a slow critical section; the watchdog's renewals only
confirm the znode still exists, and ``extend()`` cannot change the timeout.

**Guarantees.**  At most one holder per name as long as ZooKeeper's session
rules hold: the holder treats a dropped connection (kazoo's SUSPENDED, which
kazoo reports after two thirds of the session timeout without a reply) as a
lost lease at once, sets ``held.lost`` and cancels the body, before the server
can expire the session and hand the lock on.  This relies on the two clocks
advancing at similar rates and on the process not being paused between its
last check and its write, so protect the resource with ``held.fence`` as
with every lease.  Waiters are served in arrival order (the recipe is fair by
construction).  A znode left by a cancelled acquire or a lost lease is deleted
as soon as the session can reach the server; if the session expired instead,
ZooKeeper has deleted it already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from asgi_dist.backends.zookeeper import ZooKeeperBackend, ZooKeeperSession
from asgi_dist.errors import BackendUnavailable, ConfigError
from asgi_dist.locks.backend import Attempt, Renewal, Watch

if TYPE_CHECKING:
    from asgi_dist.backends import Runtime
    from asgi_dist.locks.lease import Held, Watchdog

__all__ = ["ZooKeeperLeases"]

log = logging.getLogger("asgi_dist.locks")

_LEASE = "lease-"
# Bounds one attempt when predecessors keep vanishing between the listing and
# the watch (each round means a waiter ahead of us gave up meanwhile).
_MAX_ROUNDS = 16
# How often the reaper retries deleting orphaned znodes while it cannot.
_REAP_EVERY = 0.5
_REAP_TRIES = 120


def _segment(text: str) -> str:
    """``text`` as one znode name: no '/', nothing ZooKeeper refuses."""
    seg = quote(text, safe=":@!$&'()*+,;=-_~")
    return seg.replace(".", "%2E") if seg in (".", "..") else seg


def _sequence(child: str) -> int:
    return int(child.rpartition("-")[2])


@dataclass(eq=False)
class _Contender:
    """One token's znode in the queue of one name, and what we know of it."""

    kind: str
    name: str
    token: str
    session: ZooKeeperSession
    parent: str
    prefix: str  # lease-<id>-
    path: str | None = None
    fence: int = 0
    session_id: int | None = None  # the session that owns the znode
    # A create whose reply was lost may have made a znode: look it up by prefix.
    uncertain: bool = False
    acquired: bool = False
    lost: bool = False
    ending: bool = False  # release() started: no more attempts
    pending: asyncio.Task[Attempt] | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    armed_on: str | None = None  # the predecessor whose watch is pending
    hooked: bool = False  # our on_end callback is on its Held
    wakeups: int = 0


class _ContenderWatch:
    __slots__ = ("event",)

    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    def close(self) -> None:
        # The znode (and its watch) belong to the attempt, which release() ends.
        pass


class ZooKeeperLeases:
    """:class:`~asgi_dist.locks.backend.LeaseBackend` on ZooKeeper (kazoo)."""

    name = "zookeeper"
    # Every release and every session expiry deletes a znode, which fires the
    # successor's watch: there is nothing to poll.
    poll_interval: float | None = None

    def __init__(self, runtime: Runtime, watchdog: Watchdog) -> None:
        if runtime.zookeeper is None:
            raise ConfigError(
                "backend='zookeeper' needs ZooKeeper: pass Dist(zookeeper='host:port') or set "
                "ASGI_DIST_ZOOKEEPER_HOSTS (and pip install 'asgi-dist[zookeeper]')"
            )
        self._zk: ZooKeeperBackend = runtime.zookeeper
        self._spawn = runtime.spawn
        self._watchdog = watchdog
        self._contenders: dict[tuple[str, str, str], _Contender] = {}
        self._listened: weakref.WeakSet[ZooKeeperSession] = weakref.WeakSet()
        self._orphans: set[_Contender] = set()
        self._reaper: asyncio.Task[Any] | None = None
        self._reachable = asyncio.Event()
        self._containers = True  # until the server says it has none
        # Counters: attempts made and watch events received by this process.
        self.attempts = 0
        self.wakeups = 0

    def on_start(self) -> None:
        """The Dist starts again, maybe on another event loop: the last run's
        sessions are closed, and with them its znodes; start afresh."""
        self._contenders.clear()
        self._orphans.clear()
        self._reaper = None
        self._reachable = asyncio.Event()

    # LeaseBackend ------------------------------------------------------------------

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        key = (kind, name, token)
        contender = self._contenders.get(key)
        if contender is None:
            session = await self._zk.session(ttl)
            self._listen(session)
            contender = self._contenders.setdefault(key, self._new_contender(session, key))
        if contender.ending:
            raise RuntimeError(f"acquire() after release() of token {token!r}")
        # The attempt runs in its own task: a cancelled caller must not cut a
        # create in half, or release() could miss the znode it makes.
        task = asyncio.ensure_future(self._attempt(contender))
        task.add_done_callback(_retrieve)
        contender.pending = task
        attempt = await asyncio.shield(task)
        if attempt.acquired and contender.lost:
            # The connection dropped between the reply and now: the caller
            # must not start a critical section on a lease already given up.
            raise contender.session.unavailable("the connection dropped while acquiring")
        return attempt

    async def release(self, kind: str, name: str, token: str) -> bool:
        contender = self._contenders.get((kind, name, token))
        if contender is None:
            return False
        contender.ending = True
        pending = contender.pending
        if pending is not None and not pending.done():
            await asyncio.wait([pending], timeout=contender.session.timeout)
            if not pending.done():
                self._orphan(contender)
                raise contender.session.unavailable("an acquire attempt is still in flight")
        held = contender.acquired and not contender.lost
        try:
            deleted = await self._delete(contender)
        except BackendUnavailable:
            self._orphan(contender)
            raise
        self._forget(contender)
        return held and deleted

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool:
        # The session, not this call, keeps the znode alive (kazoo's heartbeats);
        # a round trip proves it still exists, i.e. the session was alive when
        # it was sent.  ``ttl`` cannot change a live session's timeout.
        contender = self._contenders.get((kind, name, token))
        if contender is None or not contender.acquired or contender.lost:
            return False
        self._hook(contender)
        if contender.path is None or _live_id(contender.session) != contender.session_id:
            contender.lost = True  # a new session: the old one took the znode with it
            self._forget(contender)
            return False
        stat = await contender.session.call("exists", contender.path)
        if stat is None or stat.ephemeralOwner != contender.session_id:
            contender.lost = True
            self._forget(contender)
            return False
        return True

    async def renew_many(self, leases: Sequence[Renewal]) -> list[bool | BaseException]:
        # Requests of one session are pipelined on its connection: one round trip.
        results = await asyncio.gather(
            *(self.renew(r.kind, r.name, r.token, r.ttl) for r in leases),
            return_exceptions=True,
        )
        return [r if isinstance(r, BaseException) else bool(r) for r in results]

    async def holder(self, kind: str, name: str) -> str | None:
        from kazoo.exceptions import NoNodeError

        session = self._zk.default
        if session is None:
            raise BackendUnavailable(f"ZooKeeper at {self._zk.where} is not connected")
        parent = self._parent(kind, name)
        for _ in range(_MAX_ROUNDS):
            try:
                children = await session.call("get_children", parent)
                queue = _ordered(children)
                if not queue:
                    return None
                data, _stat = await session.call("get", f"{parent}/{queue[0]}")
                return bytes(data).decode()
            except NoNodeError:
                continue  # released between the two reads: look again
        return None

    async def watch(self, kind: str, name: str, token: str) -> Watch:
        contender = self._contenders.get((kind, name, token))
        return _ContenderWatch(asyncio.Event() if contender is None else contender.event)

    # the recipe ---------------------------------------------------------------------

    def _parent(self, kind: str, name: str) -> str:
        return f"{self._zk.root}/{_segment(kind)}/{_segment(name)}"

    def _new_contender(self, session: ZooKeeperSession, key: tuple[str, str, str]) -> _Contender:
        kind, name, token = key
        ident = _segment(token.partition("@")[0])
        return _Contender(kind, name, token, session, self._parent(kind, name), f"{_LEASE}{ident}-")

    async def _attempt(self, c: _Contender) -> Attempt:
        from kazoo.exceptions import NoNodeError

        self.attempts += 1
        session = c.session
        for _ in range(_MAX_ROUNDS):
            if c.path is not None and c.session_id != _live_id(session):
                # The session that owned our znode expired: the znode is gone
                # and our place in the queue with it.
                c.path, c.armed_on = None, None
            if c.path is None and not await self._find(c):
                children = await self._create(c)
                if c.path is None:
                    continue  # the name's node was removed under us: create again
            else:
                try:
                    children = await session.call("get_children", c.parent)
                except NoNodeError:
                    children = []
            queue = _ordered(children)
            mine = c.path.rpartition("/")[2] if c.path else ""
            if mine not in queue:
                c.path = None  # deleted behind our back: queue again
                continue
            index = queue.index(mine)
            if index == 0:
                c.acquired = True
                return Attempt(True, c.fence, session.timeout)
            predecessor = f"{c.parent}/{queue[index - 1]}"
            if c.armed_on == predecessor:
                return self._waiting(c)  # its watch is still pending
            c.armed_on = predecessor
            try:
                # get, not exists: a watch from exists on a vanished node would
                # wait on the server for a creation that never comes.
                await session.call("get", predecessor, watch=self._watcher(c, predecessor))
                return self._waiting(c)
            except NoNodeError:
                c.armed_on = None  # it left between the listing and the watch: look again
        return Attempt(False, 0, 0.05, queued=True)

    @staticmethod
    def _waiting(c: _Contender) -> Attempt:
        # ``remaining`` bounds the waiter's sleep before a safety re-check; the
        # predecessor's watch is what wakes it.
        return Attempt(False, 0, c.session.timeout, queued=True)

    async def _create(self, c: _Contender) -> list[str]:
        """Queue up: create our znode and list the queue, in one round trip."""
        from kazoo.exceptions import NoNodeError

        c.uncertain = True  # until the reply says what happened
        made, listed = await c.session.pipeline(
            (
                "create",
                (f"{c.parent}/{c.prefix}", c.token.encode()),
                {"ephemeral": True, "sequence": True, "include_data": True},
            ),
            ("get_children", (c.parent,), {}),
        )
        if isinstance(made, NoNodeError):
            c.uncertain = False  # refused: nothing was created
            await self._make_parent(c)
            return []
        if isinstance(made, BaseException):
            raise made
        path, stat = made
        c.path, c.fence, c.session_id = path, int(stat.czxid), int(stat.ephemeralOwner)
        c.uncertain = False
        if isinstance(listed, BaseException):
            raise listed
        return list(listed)

    async def _make_parent(self, c: _Contender) -> None:
        """Create the name's node: a container, which ZooKeeper removes when idle."""
        from kazoo.exceptions import NodeExistsError, NoNodeError

        if self._containers:
            try:
                await c.session.call("create_container", c.parent)
                return
            except NodeExistsError:
                return  # another contender made it
            except NoNodeError:
                pass  # the kind's node is missing: first use in this namespace
            except BackendUnavailable:
                raise
            except Exception as exc:
                # A server before 3.5 has no containers: persistent nodes, which
                # stay after use (one empty znode per name ever locked).
                log.warning("ZooKeeper refused a container node (%r): using persistent ones", exc)
                self._containers = False
        await c.session.call("ensure_path", c.parent.rpartition("/")[0])
        if not self._containers:
            await c.session.call("ensure_path", c.parent)

    async def _find(self, c: _Contender) -> bool:
        """After a create with a lost reply: adopt the znode it may have made."""
        from kazoo.exceptions import NoNodeError

        if not c.uncertain:
            return False
        try:
            children = await c.session.call("get_children", c.parent)
        except NoNodeError:
            children = []
        for child in sorted(ch for ch in children if ch.startswith(c.prefix)):
            path = f"{c.parent}/{child}"
            stat = await c.session.call("exists", path)
            if stat is None:
                continue
            if c.path is None and stat.ephemeralOwner == _live_id(c.session):
                c.path, c.fence, c.session_id = path, int(stat.czxid), int(stat.ephemeralOwner)
            else:
                await self._delete_path(c.session, path)  # a duplicate: never two per token
        c.uncertain = False
        return c.path is not None

    async def _delete(self, c: _Contender) -> bool:
        """Delete the contender's znode."""
        from kazoo.exceptions import NoNodeError

        await self._find(c)
        if c.path is None:
            return False
        if c.session_id != _live_id(c.session):
            c.path = None  # its session expired: ZooKeeper deleted it already
            return False
        path, c.path = c.path, None
        try:
            await c.session.call("delete", path)
        except NoNodeError:
            return False
        except BaseException:
            c.path = path  # still ours: the caller or the reaper tries again
            raise
        return True

    @staticmethod
    async def _delete_path(session: ZooKeeperSession, path: str) -> bool:
        from kazoo.exceptions import NoNodeError, NotEmptyError

        try:
            await session.call("delete", path)
        except (NoNodeError, NotEmptyError):
            return False
        return True

    def _watcher(self, c: _Contender, path: str) -> Callable[[Any], None]:
        loop = asyncio.get_running_loop()

        def fired(event: Any) -> None:  # kazoo's thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._woken, c, path)

        return fired

    def _woken(self, c: _Contender, path: str) -> None:
        if c.armed_on == path:
            c.armed_on = None
            c.wakeups += 1
            self.wakeups += 1
            c.event.set()

    # lost sessions, lost leases, orphans --------------------------------------------

    def _listen(self, session: ZooKeeperSession) -> None:
        if session not in self._listened:
            self._listened.add(session)
            session.on_state(lambda state: self._on_state(session, state))

    def _on_state(self, session: ZooKeeperSession, state: str) -> None:
        mine = [c for c in self._contenders.values() if c.session is session]
        if state == "CONNECTED":
            self._reachable.set()
            if self._orphans and (self._reaper is None or self._reaper.done()):
                self._reaper = self._spawn("zookeeper-reaper", self._reap)
            for c in mine:
                # kazoo dropped our watches with the connection: look again.
                c.armed_on = None
                c.event.set()
            return
        # SUSPENDED: the server may expire the session any moment now and give
        # the lock to the next waiter; LOST: it has.  Either way the holder
        # must stop now (Curator's default policy), and its znode must go once
        # the session (if it survives) reaches the server again.
        for c in mine:
            if c.acquired and not c.lost and not c.ending:
                c.lost = True
                self._orphan(c)
                for held in self._helds(c):
                    held.mark_lost(f"the ZooKeeper session was {state.lower()}")

    def _helds(self, c: _Contender) -> list[Held]:
        return [h for h in self._watchdog.held if h.backend is self and h.token == c.token]

    def _hook(self, c: _Contender) -> None:
        """Delete the znode of a lease its holder gives up without release()."""
        if c.hooked:
            return
        for held in self._helds(c):
            c.hooked = True
            held.on_end(lambda h: self._ended(c, h))

    def _ended(self, c: _Contender, held: Held) -> None:
        if held.lost.is_set() and not c.ending:
            # e.g. the watchdog gave up after failed renewals: ZooKeeper would
            # keep the znode (and the lock) as long as the session lives.
            c.lost = True
            self._orphan(c)

    def _orphan(self, c: _Contender) -> None:
        self._orphans.add(c)
        if self._reaper is None or self._reaper.done():
            self._reaper = self._spawn("zookeeper-reaper", self._reap)
        self._reachable.set()

    def _forget(self, c: _Contender) -> None:
        self._orphans.discard(c)
        if self._contenders.get((c.kind, c.name, c.token)) is c:
            del self._contenders[(c.kind, c.name, c.token)]

    async def _reap(self) -> None:
        for _ in range(_REAP_TRIES):
            if not self._orphans:
                return
            self._reachable.clear()
            for c in list(self._orphans):
                if c.pending is not None and not c.pending.done():
                    continue  # it may still create the znode: wait for it
                try:
                    await self._delete(c)
                except BackendUnavailable:
                    continue
                except Exception:
                    log.warning("could not delete a znode of %s %r", c.kind, c.name, exc_info=True)
                self._forget(c)
            if self._orphans:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reachable.wait(), _REAP_EVERY)
        # Still unreachable: the next reconnection starts the reaper again.
        log.warning("%d orphaned ZooKeeper znodes wait for a reconnection", len(self._orphans))


def _live_id(session: ZooKeeperSession) -> int:
    """The session's id; raises while disconnected (it may or may not survive)."""
    session_id = session.session_id
    if session_id is None:
        raise session.unavailable("the session is disconnected")
    return session_id


def _ordered(children: list[str]) -> list[str]:
    return sorted(
        (ch for ch in children if ch.startswith(_LEASE) and ch[-10:].isdigit()), key=_sequence
    )


def _retrieve(task: asyncio.Task[Attempt]) -> None:
    # A caller that was cancelled never reads the attempt's outcome.
    if not task.cancelled():
        task.exception()
