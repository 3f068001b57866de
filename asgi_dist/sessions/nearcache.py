"""Near cache: recently used sessions kept in this process, invalidated by every write.

The modern form of Tomcat's session replication: instead of shipping session
data between nodes, every write publishes the session's handle on one Redis
channel (inside the same script, so a save stays one round trip) and every
process drops its copy.  A read-only request on a hot session then makes no
store round trip at all.

Consistency rules:

* A copy is served only while the process is subscribed and its pub/sub
  connection is up: from the moment that connection drops until its
  subscription is restored, invalidations are lost and no copy is served; on
  the reconnect (messages may have been lost) everything is dropped.
* A load that raced with an invalidation of the same session is not cached:
  every invalidation bumps a tick, and a load stamped before the last
  invalidation of its handle is discarded.
* A copy lives at most ``near_cache_ttl`` and at most a tenth of the idle
  timeout, so the store still sees activity often enough to refresh the TTL.
* A process's own write keeps its copy: the write's message carries a tag, and
  when that echo comes back every message published before the write has been
  read too (one connection delivers in order).  If none of them touched the
  session since it was loaded, loaded state + delta is exactly the stored state.
  So a hot session written through one process costs one round trip, not two.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from asgi_dist.backends.pubsub import PubSubHub, Subscription
from asgi_dist.sessions.config import SessionConfig
from asgi_dist.sessions.store import StoredSession

__all__ = ["NearCache"]

log = logging.getLogger("asgi_dist.sessions")

_FORGET_AFTER = 10_000  # invalidation ticks remembered per process
_PENDING_ECHOES = 1_000  # own writes awaiting their echo


@dataclass(slots=True)
class _Entry:
    stored: StoredSession
    fresh_until: float  # loop time
    ends: float  # loop time when the store ends the session, unless accessed again


def _copy(stored: StoredSession, ttl: float) -> StoredSession:
    # The request's Session owns (and mutates) its fields dict: never share one.
    return StoredSession(
        dict(stored.fields),
        stored.user_id,
        stored.created,
        stored.last_access,
        ttl,
        stored.moved,
        stored.version,
    )


class NearCache:
    """The per-process session cache of one Dist."""

    def __init__(self, config: SessionConfig, channel: str) -> None:
        self.config = config
        self.channel = channel
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._tick = 0
        self._invalidated: OrderedDict[str, int] = OrderedDict()  # handle -> tick
        self._floor = 0  # loads stamped before this tick are never cached
        self._subscription: Subscription | None = None
        self._hub: PubSubHub | None = None
        self._tags = (f"{secrets.token_hex(4)}:{n}" for n in itertools.count())
        # tag -> (handle, state after the write, tick of the writer's own drop, loop
        # time when the store ends the session unless accessed again)
        self._echoes: OrderedDict[str, tuple[str, StoredSession, int, float]] = OrderedDict()
        self._echo_of: dict[str, str] = {}  # handle -> tag of its pending echo
        # Tags of writes sent but not yet answered -> whether their echo came
        # already: on its own connection, the echo may be read before the reply.
        self._sent: OrderedDict[str, bool] = OrderedDict()
        # Requests waiting for a message about a handle (see wait_echo).
        self._arrivals: dict[str, asyncio.Future[None]] = {}
        self.hits = 0
        self.misses = 0

    async def start(self, hub: PubSubHub) -> None:
        self._hub = hub
        self._subscription = await hub.subscribe(self.channel, self._on_message)

    @property
    def listening(self) -> bool:
        """Invalidations reach this process now (subscribed, connection up)."""
        hub = self._hub
        return self._subscription is not None and hub is not None and hub.listening(self.channel)

    def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        self._entries.clear()

    def __len__(self) -> int:
        """Sessions held now."""
        return len(self._entries)

    def __contains__(self, handle: object) -> bool:
        return handle in self._entries

    def _on_message(self, payload: bytes | None) -> None:
        self._tick += 1
        if payload is None:
            # Reconnected: invalidations may have been missed.
            self._entries.clear()
            self._echoes.clear()
            self._echo_of.clear()
            self._sent.clear()
            self._floor = self._tick
            arrivals, self._arrivals = self._arrivals, {}
            for arrival in arrivals.values():
                if not arrival.done():
                    arrival.set_result(None)
            return
        handle, _, tag = payload.decode().partition(" ")
        waiting = self._arrivals.pop(handle, None)
        if waiting is not None and not waiting.done():
            # Its waiters resume after this message was applied (below).
            waiting.set_result(None)
        if tag and tag in self._sent:
            # Our own write, echoed before its reply was read: not another
            # writer's change; saved() decides about the copy.
            self._sent[tag] = True
            return
        echo = self._echoes.pop(tag, None) if tag else None
        if self._echo_of.get(handle) == tag:
            del self._echo_of[handle]
        if echo is None:
            self.drop(handle)
            return
        # Our own write came back: everything published before it was read already.
        _, stored, own_tick, ends = echo
        if self._invalidated.get(handle) == own_tick:
            stored.ttl = ends - asyncio.get_running_loop().time()
            self._store(handle, stored)

    def tag(self) -> str:
        """A fresh tag for one write of this process."""
        return next(self._tags)

    def sending(self, tag: str) -> None:
        """This process is about to send the write tagged ``tag``."""
        if self.listening:
            self._sent[tag] = False
            if len(self._sent) > _PENDING_ECHOES:
                self._sent.popitem(last=False)

    def unsent(self, tag: str) -> None:
        """The write tagged ``tag`` failed or was refused: expect no echo of it."""
        self._sent.pop(tag, None)

    def unchanged_since(self, handle: str, stamp: int) -> bool:
        """No invalidation of ``handle`` was read since ``stamp``."""
        return stamp >= self._floor and self._invalidated.get(handle, -1) <= stamp

    def saved(self, handle: str, tag: str, stored: StoredSession, stamp: int) -> None:
        """This process wrote ``handle`` (tagged ``tag``) over state loaded at ``stamp``;
        ``stored.ttl`` counts from now.

        The copy is dropped now; it comes back as ``stored`` when the write's echo
        arrives, unless another process's write was read meanwhile.
        """
        echoed = self._sent.pop(tag, False)
        consistent = self.unchanged_since(handle, stamp)
        self.drop(handle)
        if echoed:
            # Every message published before the write was read before its echo,
            # and nothing about the session since the load: keep the copy now.
            if consistent and self.listening:
                self._store(handle, stored)
            return
        if consistent and self.listening:
            ends = asyncio.get_running_loop().time() + stored.ttl
            self._echoes[tag] = (handle, stored, self._tick, ends)
            self._echo_of[handle] = tag
            if len(self._echoes) > _PENDING_ECHOES:
                old_tag, (old_handle, *_) = self._echoes.popitem(last=False)
                if self._echo_of.get(old_handle) == old_tag:
                    del self._echo_of[old_handle]

    def echo_pending(self, handle: str) -> bool:
        """This process wrote ``handle`` and waits for the write's echo to keep its copy."""
        return handle in self._echo_of

    async def wait_echo(self, handle: str, timeout: float) -> None:  # noqa: ASYNC109
        """Wait up to ``timeout`` for the next message about ``handle`` (normally the
        pending echo of this process's write), so that the copy it restores can serve."""
        arrival = self._arrivals.get(handle)
        if arrival is None or arrival.done():
            arrival = self._arrivals[handle] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(arrival)  # shared by every request waiting on it
        except TimeoutError:
            if self._arrivals.get(handle) is arrival:
                del self._arrivals[handle]

    def created(self, handle: str, stored: StoredSession) -> None:
        """A session this process just created: nobody else knows its id yet."""
        if self.listening:
            self._store(handle, stored)

    def drop(self, handle: str) -> None:
        self._tick += 1
        self._entries.pop(handle, None)
        self._invalidated[handle] = self._tick
        self._invalidated.move_to_end(handle)
        if len(self._invalidated) > _FORGET_AFTER:
            _, tick = self._invalidated.popitem(last=False)
            self._floor = max(self._floor, tick)

    def stamp(self) -> int:
        """Taken before a load; ``put`` refuses the result if the session changed since."""
        return self._tick

    def get(self, handle: str, min_version: int = 0) -> StoredSession | None:
        """The cached copy, unless it is older than ``min_version`` (the version the
        client's cookie saw written): then the client must not read behind its own write."""
        entry = self._entries.get(handle)
        # Not listening (the pub/sub connection dropped and is not restored yet): an
        # invalidation published meanwhile is lost, so no copy can be trusted.
        if entry is None or not self.listening or entry.stored.version < min_version:
            self.misses += 1
            return None
        now = asyncio.get_running_loop().time()
        if now >= entry.fresh_until:
            del self._entries[handle]
            self.misses += 1
            return None
        self._entries.move_to_end(handle)
        self.hits += 1
        # Its ttl as of now, not as of the load: a write through this copy keeps the
        # writer's copy only as long as the store keeps the session (see _store).
        return _copy(entry.stored, entry.ends - now)

    def put(self, handle: str, stored: StoredSession, stamp: int) -> None:
        if not self.listening or stored.moved:
            return
        if not self.unchanged_since(handle, stamp):
            return  # an invalidation crossed this load
        self._store(handle, stored)

    def _store(self, handle: str, stored: StoredSession) -> None:
        """Keep ``stored``, whose ``ttl`` counts from now (at least what the store
        keeps it: a copy never outlives the session's absolute timeout)."""
        lifetime = min(self.config.near_cache_ttl, self.config.refresh_interval, stored.ttl)
        if lifetime <= 0:
            return
        now = asyncio.get_running_loop().time()
        self._entries[handle] = _Entry(_copy(stored, stored.ttl), now + lifetime, now + stored.ttl)
        self._entries.move_to_end(handle)
        while len(self._entries) > self.config.near_cache_size:
            self._entries.popitem(last=False)
