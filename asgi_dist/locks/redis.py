"""Leases in Redis: one Lua script per step, all keys of a lease in one hash slot.

Keys of the lease ``name`` of kind ``kind`` (namespace ``ns``)::

    {ns:kind:name}:lease   hash {token, fence}, PEXPIRE ttl (the server's clock)
    {ns:kind:name}:fence   counter, never deleted: fences never repeat
    {ns:kind:name}:waiters plain locks: the processes waiting, in arrival order
    {ns:kind:name}:heads   plain locks: the one waiter of each such process that
                           a release hands the lease to (not on Redis Cluster)
    {ns:kind:name}:queue   fair mode: waiters in arrival order (+ :alive, :ttls)
    {ns:kind:name}:wake    pub/sub channel a release publishes to (plain locks:
                           ...:wake:<process>, one per waiting process)

acquire, release and renew are one round trip each; renewals of every lease a
process holds are pipelined into one round trip per tick (per shard).  A
release may hand the lease on in the same round trip: to a waiter of this
process (``release_to_soon``, lock cohorting), else to the head waiter of the
process waiting longest (plain locks) or to the queue's head (fair mode): the
new holder learns it from its pub/sub message, with no round trip of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from asgi_dist.backends.pubsub import PubSubHub, Subscription
from asgi_dist.backends.redis import RedisBackend, Script
from asgi_dist.locks.backend import Attempt, Renewal, Watch, limit_mismatch

__all__ = ["FAIR", "PLAIN", "READ", "SEMAPHORE", "WRITE", "RedisLeases", "Variant"]

_PACKAGE = "asgi_dist.locks"
_NAME_CACHE = 10_000  # lock names whose keys are remembered


@dataclass(frozen=True, slots=True)
class Variant:
    """Which scripts and keys implement one flavour of lease.

    Every acquire script takes ``ARGV = token, ttl_ms, waiter_ttl_ms, channel,
    *extra``; release scripts ``token, channel``; renew scripts get the keys at
    ``renew_keys`` (the lease first) and ``token, ttl_ms``.
    """

    acquire: str
    release: str
    renew: str
    suffixes: tuple[str, ...]
    queued: bool  # a failed attempt leaves an entry (queue position, writer intent)
    # The lease first, then keys that must live as long as it (the hash of a
    # semaphore's fences and of the limit its permits were granted under).
    renew_keys: tuple[int, ...] = (0,)
    holder_key: int | None = 0  # the hash whose 'token' names the exclusive holder
    # Waiting processes queue in a set and a release wakes the first one on its
    # own channel (the plain lock); otherwise a release wakes every waiter.
    wakes_one: bool = False
    # A hand-off is published on the recipient node's own channel (fair mode).
    wakes_node: bool = False


PLAIN = Variant(
    "acquire",
    "release",
    "renew",
    ("lease", "fence", "waiters", "heads"),
    queued=False,
    wakes_one=True,
)
FAIR = Variant(
    "fair_acquire",
    "fair_release",
    "renew",
    ("lease", "fence", "queue", "alive", "ttls"),
    queued=True,
    wakes_node=True,
)
SEMAPHORE = Variant(
    "sem_acquire",
    "sem_release",
    "sem_renew",
    ("permits", "fence", "fences"),
    queued=False,
    renew_keys=(0, 2),
    holder_key=None,
)
_RW = ("readers", "fence", "rfences", "writer", "wwait")
READ = Variant(
    "rw_read", "sem_release", "sem_renew", _RW, queued=False, renew_keys=(0, 2), holder_key=3
)
WRITE = Variant(
    "rw_write", "rw_write_release", "renew", _RW, queued=True, renew_keys=(3,), holder_key=3
)


class _PubSubWatch:
    __slots__ = ("_digest", "_key", "_local", "_origin", "_sub", "_token", "event", "granted")

    def __init__(
        self,
        token: str,
        origin: str,
        local: dict[tuple[str, str], set[_PubSubWatch]],
        key: tuple[str, str],
    ) -> None:
        self.event = asyncio.Event()
        # Set by a fair hand-off naming us: the fence of the lease we now hold.
        self.granted: int | None = None
        # Fair hand-offs name their recipient by a digest of its token: made when
        # the first such message comes (plain locks never need it).
        self._token = token
        self._digest: bytes | None = None
        self._origin = origin
        self._sub: Subscription | None = None
        self._local = local
        self._key = key
        local.setdefault(key, set()).add(self)

    def _on_message(self, payload: bytes | None) -> None:
        if payload is not None:
            if payload.startswith(b"to:"):
                # A fair hand-off names its recipient: the rest of the queue sleeps on.
                digest, _, fence = payload[3:].partition(b":")
                if self._digest is None:
                    self._digest = hashlib.sha1(self._token.encode()).hexdigest().encode()
                if digest != self._digest:
                    return
                self.granted = int(fence)
            elif payload[:9] == b"released:" and payload[9:] == self._origin.encode():
                # Our own process released: its waiters were woken directly,
                # and a second wake-up would cost each of them a round trip.
                return
        self.event.set()

    def close(self) -> None:
        watchers = self._local.get(self._key)
        if watchers is not None:
            watchers.discard(self)
            if not watchers:
                del self._local[self._key]
        # Dropped, not just closed: the subscription's callback refers back to
        # us, a cycle only the garbage collector (a pause) would free.
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.close()


class RedisLeases:
    """:class:`~asgi_dist.locks.backend.LeaseBackend` on one Redis deployment."""

    name = "redis"

    def __init__(
        self,
        redis: RedisBackend,
        hub: Callable[[], PubSubHub],
        variant: Variant = PLAIN,
        *,
        waiter_ttl: float = 10.0,
        extra: tuple[int | str, ...] = (),
    ) -> None:
        self.redis = redis
        # The process's pub/sub hub, looked up on use (it is created lazily
        # and replaced when the Dist restarts).
        self._hub = hub
        self.variant = variant
        self.waiter_ttl = waiter_ttl
        self._extra = extra
        # Queued waiters re-attempt to prove they are alive (refreshing their
        # entry); plain waiters sleep until a wake-up or the holder's expiry.
        self.poll_interval: float | None = waiter_ttl / 3 if variant.queued else None
        # Several holders at once (semaphore permits, readers): a local waiter that
        # wins one does not make the others wait for its release.
        self.shared = variant in (SEMAPHORE, READ)
        # This process's waiters per lease: a release made here wakes them at
        # once instead of after the pub/sub echo (queued variants name their
        # recipient and rely on the echo).
        self._local: dict[tuple[str, str], set[_PubSubWatch]] = {}
        # Tags this backend's releases so its waiters skip their echo.
        self._origin = secrets.token_hex(6)
        # On a cluster a channel's subscribers are spread over the nodes.
        self._partial_numsub = isinstance(redis.client, RedisCluster)
        self._complete_counts = "0" if self._partial_numsub else "1"
        # A release hands the lease to a waiting process only where PUBLISH's count
        # of listeners is complete (not Cluster: there it wakes the process).
        self._suffixes = tuple(
            s for s in variant.suffixes if not (s == "heads" and self._partial_numsub)
        )
        self._acquire = redis.script(_PACKAGE, variant.acquire)
        self._release = redis.script(_PACKAGE, variant.release)
        self._renew = redis.script(_PACKAGE, variant.renew)
        self._leave = redis.script(_PACKAGE, "leave")
        self._name_cache: dict[tuple[str, str], tuple[list[str], str]] = {}

    @property
    def scripts(self) -> tuple[Script, ...]:
        return (self._acquire, self._release, self._renew, self._leave)

    @property
    def registers_waiters(self) -> bool:
        """A waiting attempt queues its process (``acquire(register=True)``), and a
        process that stops waiting must :meth:`leave`."""
        return self.variant.wakes_one

    def tag(self, kind: str, name: str) -> str:
        return self.redis.key(kind, name)

    def keys(self, kind: str, name: str) -> list[str]:
        return self._names(kind, name)[0]

    def channel(self, kind: str, name: str) -> str:
        return self._names(kind, name)[1]

    def _names(self, kind: str, name: str) -> tuple[list[str], str]:
        # Every acquire and release needs them: built (and validated) once per name.
        names = self._name_cache.get((kind, name))
        if names is None:
            if len(self._name_cache) >= _NAME_CACHE:
                self._name_cache.clear()
            tag = self.tag(kind, name)
            keys = [f"{tag}:{suffix}" for suffix in self._suffixes]
            names = self._name_cache[(kind, name)] = (keys, f"{tag}:wake")
        return names

    async def load_scripts(self) -> None:
        for script in self.scripts:
            await script.load(self.redis.client)

    async def acquire(
        self, kind: str, name: str, token: str, ttl: float, *, register: bool = False
    ) -> Attempt:
        args = [token, _ms(ttl), _ms(self.waiter_ttl), self.channel(kind, name), *self._extra]
        if self.variant.wakes_node:
            args.append(self._complete_counts)  # fair: skip heads nobody listens for
        if register and self.variant.wakes_one:
            args.append(self._origin)
        keys = self.keys(kind, name)
        got, value, remaining = await self._acquire(self.redis.commands, keys, args)
        if got == -1:
            raise limit_mismatch(kind, name, int(value), int(self._extra[0]))
        return Attempt(bool(got), int(value), int(remaining) / 1000.0, self.variant.queued)

    async def release(self, kind: str, name: str, token: str) -> bool:
        keys = self.keys(kind, name)
        reply = await self._release(
            self.redis.commands, keys, self._release_args(kind, name, token)
        )
        self._released_here(kind, name, reply)
        return bool(reply)

    def _released_here(self, kind: str, name: str, reply: Any) -> None:
        # This process's waiters hear of its releases at once, not via pub/sub
        # (unless the lease went to another process's waiter: 2).
        if reply == 1 and not self.variant.queued:
            for watch in list(self._local.get((kind, name), ())):
                watch.event.set()

    def release_soon(self, kind: str, name: str, token: str) -> asyncio.Future[bool]:
        """:meth:`release`, already sent: it completes even if nobody awaits it."""
        released: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def settle(reply: Any, error: BaseException | None) -> None:
            if error is None:
                self._released_here(kind, name, reply)
            if released.done():
                return
            if error is not None:
                released.set_exception(error)
            else:
                released.set_result(bool(reply))

        args = self._release_args(kind, name, token)
        self._release.send(self.redis.commands, self.keys(kind, name), args, settle)
        return released

    def _release_args(self, kind: str, name: str, token: str) -> list[str]:
        args = [token, self.channel(kind, name), self._origin]
        if self.variant.wakes_node:
            # Fair hand-offs skip a head whose node no longer listens, where
            # PUBLISH's count of listeners is complete.
            args.append(self._complete_counts)
        return args

    @property
    def hands_off(self) -> bool:
        """Whether :meth:`release_to_soon` is supported (the plain lock)."""
        return self.variant is PLAIN

    def release_to_soon(
        self,
        kind: str,
        name: str,
        token: str,
        next_token: str,
        next_ttl: float,
        on_done: Callable[[tuple[int, int] | bool | None, BaseException | None], None],
        *,
        yield_to_others: bool = False,
        reserve: int = 1,
    ) -> None:
        """Release straight to ``next_token`` (a waiter of this process), sent now;
        ``on_done(outcome, error)`` runs as the reply is read.

        With ``yield_to_others`` the lease goes to another process instead when
        one waits.  The outcome is the fences reserved when handed on
        (``reserve`` of them: the first is the new holder's, the rest are this
        process's to hand out), True when released to others, False if ``token``
        no longer held the lease, None on an error.
        """
        args = self._release_to_args(
            kind, name, token, next_token, next_ttl, yield_to_others, reserve
        )

        def settle(reply: Any, error: BaseException | None) -> None:
            on_done(None if error is not None else _handed_on(reply), error)

        self._release.send(self.redis.commands, self.keys(kind, name), args, settle)

    def _release_to_args(
        self,
        kind: str,
        name: str,
        token: str,
        next_token: str,
        next_ttl: float,
        yield_to_others: bool,
        reserve: int,
    ) -> list[str | int]:
        mode = ("2" if self._partial_numsub else "1") if yield_to_others else "0"
        channel = self.channel(kind, name)
        return [token, channel, self._origin, next_token, _ms(next_ttl), mode, reserve]

    async def leave(self, kind: str, name: str, token: str) -> None:
        """The waiter that queued this process gave up: dequeue the process, passing
        on the lease (or wake-up) a release may have sent it meanwhile."""
        args = [self._origin, self.channel(kind, name), token]
        await self._leave(self.redis.commands, self.keys(kind, name), args)

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool:
        keys = self._renew_keys(kind, name)
        return bool(await self._renew(self.redis.commands, keys, [token, _ms(ttl)]))

    def _renew_keys(self, kind: str, name: str) -> list[str]:
        keys = self.keys(kind, name)
        return [keys[i] for i in self.variant.renew_keys]

    async def renew_many(self, leases: Sequence[Renewal]) -> list[bool | BaseException]:
        if not leases:
            return []
        for retry in (True, False):
            # One pipeline, which redis-py splits per shard on Cluster.  Its cluster
            # pipeline refuses .evalsha() (a script's keys could span shards), so the
            # command goes in by name: ours has one key, routed by its slot.
            pipe = self.redis.client.pipeline(transaction=False)
            for r in leases:
                keys = self._renew_keys(r.kind, r.name)
                pipe.execute_command(
                    "EVALSHA", self._renew.sha, len(keys), *keys, r.token, _ms(r.ttl)
                )
            results = await pipe.execute(raise_on_error=False)
            if retry and any(isinstance(x, redis_errors.NoScriptError) for x in results):
                # A restarted or failed-over node lost its script cache.
                await self._renew.load(self.redis.client)
                continue
            break
        return [x if isinstance(x, BaseException) else bool(x) for x in results]

    async def holder(self, kind: str, name: str) -> str | None:
        if self.variant.holder_key is None:
            return None  # shared permits have no single holder
        key = self.keys(kind, name)[self.variant.holder_key]
        value = await self.redis.client.hget(key, "token")
        return value.decode() if isinstance(value, bytes) else value

    async def watch(self, kind: str, name: str, token: str) -> Watch:
        watch = _PubSubWatch(token, self._origin, self._local, (kind, name))
        try:
            watch._sub = await self._hub().subscribe(
                self._watch_channel(kind, name, token), watch._on_message
            )
        except BaseException:
            watch.close()
            raise
        return watch

    def watch_now(self, kind: str, name: str, token: str) -> Watch | None:
        """:meth:`watch` at once if this process listens on the channel already
        (else None): set up before an attempt, it makes a second attempt needless."""
        hub = self._hub()
        channel = self._watch_channel(kind, name, token)
        watch = _PubSubWatch(token, self._origin, self._local, (kind, name))
        watch._sub = hub.subscribe_now(channel, watch._on_message)
        if watch._sub is None:
            watch.close()
            return None
        return watch

    def _watch_channel(self, kind: str, name: str, token: str) -> str:
        channel = self.channel(kind, name)
        if self.variant.wakes_one:
            return f"{channel}:{self._origin}"  # a release serves one process by name
        if self.variant.wakes_node:
            return f"{channel}:{token.partition('@')[2]}"  # hand-offs name our node
        return channel


def _handed_on(reply: Any) -> tuple[int, int] | bool:
    """The release script's reply: the fences reserved when handed on (the first is
    the new holder's), else released or not."""
    if isinstance(reply, list):
        return int(reply[1]), int(reply[2])
    return bool(reply)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
