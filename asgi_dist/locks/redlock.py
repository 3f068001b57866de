"""Redlock: a lease granted by a majority of independent Redis servers.

Follows antirez's algorithm (https://redis.io/docs/latest/develop/use/patterns/distributed-locks/):
try every server with the same token and a short per-server timeout; the lease
is held if a majority granted it and the time left, ``ttl - elapsed - drift``
with ``drift = 1 % of ttl + 2 ms``, is still positive; otherwise undo every
grant.  The holder may rely on it for that validity only, renewals included.

Fences: each server has its own counter, so the fence is the largest counter of
the granting majority, and before the grant is reported every reachable server
raises its counter to at least that fence.  Any later majority shares a server
with this one, so the next fence is larger as long as a majority of counters
survive.

A server that does not answer in time (paused, overloaded, cut off) may still
run an attempt's grant later, after the release that was meant to undo it: it
would then keep a lease nobody holds for a whole ttl, counted from whenever it
wakes.  Every release that such a server did not answer is therefore retried
in the background until the server has answered twice in a row (the second
reply is sent after every command that reached it before the first).  Each
attempt asks the servers with a token of its own (the caller's, numbered), so
that undoing a failed attempt, late or not, can never remove a grant of the
caller's next attempt.

Caveats (Kleppmann's, and they are real): a server that restarts without
persistence (or with ``appendfsync`` other than ``always``) forgets its grants
and counter, which can let two holders in and break fence order; the clock
drift rule assumes servers' clocks run at similar *rates*; and a process pause
beyond the validity is invisible to the holder.  Use fences in the store for
correctness, and prefer the single-Redis or PostgreSQL lock unless the Redis
servers really are independent failure domains.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors

from asgi_dist.backends.redis import RedisBackend, Script
from asgi_dist.errors import BackendUnavailable, ConfigError
from asgi_dist.locks.backend import Attempt, LocalWakeups, Renewal, Watch

__all__ = ["RedlockLeases"]

log = logging.getLogger("asgi_dist.locks")

_PACKAGE = "asgi_dist.locks"

# Undoing a release a server did not answer: how often, and for how long at most
# (a server paused longer than that keeps a stray grant until its ttl).
_UNDO_EVERY = 0.25
_UNDO_FOR = 600.0


class RedlockLeases:
    """:class:`~asgi_dist.locks.backend.LeaseBackend` over N independent Redis servers."""

    name = "redlock"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        namespace: str,
        server_timeout: float = 0.1,
        poll_interval: float = 0.2,
    ) -> None:
        if len(urls) < 3 or len(urls) % 2 == 0:
            raise ConfigError(
                f"Redlock needs an odd number (at least 3) of independent Redis servers, "
                f"got {len(urls)}: a majority must be meaningful"
            )
        self.servers = [RedisBackend(url, namespace=namespace) for url in urls]
        self.quorum = len(urls) // 2 + 1
        self.server_timeout = server_timeout
        # Releases on other processes are noticed by polling: the servers'
        # pub/sub would need a connection to each of them per process.
        self.poll_interval: float | None = poll_interval
        self._wakeups = LocalWakeups()
        self._acquire = Script(_PACKAGE, "acquire")
        self._release = Script(_PACKAGE, "release")
        self._renew = Script(_PACKAGE, "renew")
        self._raise = Script(_PACKAGE, "raise_fence")
        # Releases being retried on servers that did not answer them.
        self._undoing: set[asyncio.Task[None]] = set()
        # The servers' token of each caller's lease, or of its attempt in flight.
        self._tokens: dict[tuple[str, str, str], str] = {}
        self._attempts = itertools.count(1)

    async def close(self) -> None:
        undoing, self._undoing = self._undoing, set()
        for task in undoing:
            task.cancel()
        await asyncio.gather(*undoing, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self.servers), return_exceptions=True)

    def _keys(self, server: RedisBackend, kind: str, name: str) -> tuple[str, str, str]:
        tag = server.key(kind, name)
        return f"{tag}:lease", f"{tag}:fence", f"{tag}:wake"

    async def _each(self, call: Any) -> list[Any]:
        """Run ``call(server)`` on every server at once, each bounded by the server timeout."""

        async def attempt(server: RedisBackend) -> Any:
            try:
                return await call(server)
            except redis_errors.ConnectionError:
                # A pooled connection to a server that restarted: one retry on
                # a fresh connection, still within the server timeout.
                return await call(server)

        async def one(server: RedisBackend) -> Any:
            # asyncio.timeout, not wait_for: wait_for's inner task, when the caller is
            # cancelled as it times out, ends with an error nobody retrieves (logged).
            async with asyncio.timeout(self.server_timeout):
                return await attempt(server)

        return await asyncio.gather(*(one(s) for s in self.servers), return_exceptions=True)

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        key = (kind, name, token)
        # Registered before anything is sent: a cancelled or failed attempt is
        # undone through release(token), which must find it.
        ours = self._tokens[key] = _attempt_token(token, next(self._attempts))
        undone = False
        try:
            attempt = await self._attempt(kind, name, ours, ttl)
            undone = not attempt.acquired
            return attempt
        except BackendUnavailable:
            undone = True  # undone first, then found no majority answering
            raise
        finally:
            # (A cancelled attempt stays registered: its caller undoes it.)
            if undone and self._tokens.get(key) == ours:
                del self._tokens[key]  # the next attempt gets a token of its own

    async def _attempt(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        started = time.monotonic()
        # The lease is counted from here, not from when the attempt returns: the
        # holder's renew deadline (and so its ``lost``) must come before the leases
        # the servers granted at the start of the attempt can expire.
        sent = asyncio.get_running_loop().time()
        ms = max(1, round(ttl * 1000))

        async def grant(server: RedisBackend) -> Any:
            lease, fence, _ = self._keys(server, kind, name)
            return await self._acquire(server.client, [lease, fence], [token, ms])

        results = await self._each(grant)
        granted = [r for r in results if isinstance(r, list) and r[0] == 1]
        drift = ttl * 0.01 + 0.002
        validity = ttl - (time.monotonic() - started) - drift
        if len(granted) >= self.quorum and validity > 0:
            fence = max(int(r[1]) for r in granted)
            raised = await self._raise_fences(kind, name, fence)
            # Raising the fences took time of the validity too.
            validity = ttl - (time.monotonic() - started) - drift
            if raised >= self.quorum and validity > 0:
                return Attempt(True, fence, validity, renewed_at=sent)
        # No majority (or too slow): undo what we got, so others are not blocked.
        await self._release_everywhere(kind, name, token)
        self._check_outage(results)
        remaining = [int(r[2]) / 1000 for r in results if isinstance(r, list) and r[0] == 0]
        return Attempt(False, 0, min(remaining) if remaining else 0.05)

    async def _raise_fences(self, kind: str, name: str, fence: int) -> int:
        async def raise_one(server: RedisBackend) -> Any:
            return await self._raise(server.client, [self._keys(server, kind, name)[1]], [fence])

        results = await self._each(raise_one)
        return sum(1 for r in results if not isinstance(r, BaseException))

    def _check_outage(self, results: list[Any]) -> None:
        failures = [r for r in results if isinstance(r, BaseException)]
        if len(self.servers) - len(failures) < self.quorum:
            raise BackendUnavailable(
                f"Redlock: only {len(self.servers) - len(failures)} of {len(self.servers)} Redis "
                f"servers answered within {self.server_timeout:g}s; a majority "
                f"({self.quorum}) is needed ({failures[0]!r})"
            )

    async def _release_on(self, server: RedisBackend, kind: str, name: str, token: str) -> Any:
        lease, _, channel = self._keys(server, kind, name)
        return await self._release(server.client, [lease], [token, channel])

    async def release(self, kind: str, name: str, token: str) -> bool:
        ours = self._tokens.pop((kind, name, token), None)
        if ours is None:
            return False
        return await self._release_everywhere(kind, name, ours)

    async def _release_everywhere(self, kind: str, name: str, token: str) -> bool:
        results = await self._each(lambda server: self._release_on(server, kind, name, token))
        released = sum(1 for r in results if r == 1)
        if released:
            self._wakeups.wake(kind, name)
        for server, result in zip(self.servers, results, strict=True):
            if isinstance(result, BaseException):
                # It may still run our grant once it answers: undo it then.
                self._undo_later(server, kind, name, token)
        return released >= self.quorum

    def _undo_later(self, server: RedisBackend, kind: str, name: str, token: str) -> None:
        task = asyncio.ensure_future(self._undo(server, kind, name, token))
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)

    async def _undo(self, server: RedisBackend, kind: str, name: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _UNDO_FOR
        answered = 0
        while loop.time() < give_up:
            try:
                async with asyncio.timeout(max(1.0, self.server_timeout)):
                    reply = await self._release_on(server, kind, name, token)
            except Exception:
                answered = 0
                await asyncio.sleep(_UNDO_EVERY)
                continue
            if reply == 1:
                self._wakeups.wake(kind, name)
            answered += 1
            if answered == 2:
                # A grant that reached the server before our first release was
                # answered has run by now, and is undone.
                return
        log.warning(
            "Redlock: a Redis server did not answer the release of %s %r for %gs; a grant "
            "it may still hold expires by its ttl",
            kind,
            name,
            _UNDO_FOR,
        )

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool:
        key = (kind, name, token)
        ours = self._tokens.get(key)
        if ours is None:
            return False
        if await self._renew_everywhere(kind, name, ours, ttl):
            return True
        # Lost: its holder neither renews nor releases it again; the servers
        # still granting it (a minority) let it expire.
        if self._tokens.get(key) == ours:
            del self._tokens[key]
        return False

    async def _renew_everywhere(self, kind: str, name: str, token: str, ttl: float) -> bool:
        started = time.monotonic()
        ms = max(1, round(ttl * 1000))

        async def extend(server: RedisBackend) -> Any:
            lease = self._keys(server, kind, name)[0]
            return await self._renew(server.client, [lease], [token, ms])

        results = await self._each(extend)
        renewed = sum(1 for r in results if r == 1)
        in_time = time.monotonic() - started < ttl * 0.99 - 0.002
        if renewed >= self.quorum and in_time:
            return True
        if sum(1 for r in results if r == 0) >= self.quorum:
            return False  # a majority no longer knows this token: the lease is gone
        self._check_outage(results)
        return False

    async def renew_many(self, leases: Sequence[Renewal]) -> list[bool | BaseException]:
        async def one(r: Renewal) -> bool | BaseException:
            try:
                return await self.renew(r.kind, r.name, r.token, r.ttl)
            except (BackendUnavailable, redis_errors.RedisError) as exc:
                return exc

        return list(await asyncio.gather(*(one(r) for r in leases)))

    async def holder(self, kind: str, name: str) -> str | None:
        async def read(server: RedisBackend) -> Any:
            return await server.client.hget(self._keys(server, kind, name)[0], "token")

        votes: dict[Any, int] = {}
        for value in await self._each(read):
            if isinstance(value, bytes):
                votes[value] = votes.get(value, 0) + 1
        for value, count in votes.items():
            if count >= self.quorum:
                return _caller_token(value.decode())
        return None

    async def watch(self, kind: str, name: str, token: str) -> Watch:
        return self._wakeups.watch(kind, name)


def _attempt_token(token: str, number: int) -> str:
    """The servers' token of one attempt: ``<id>.<number>@<node>``."""
    ident, at, node = token.partition("@")
    return f"{ident}.{number}{at}{node}"


def _caller_token(token: str) -> str:
    ident, at, node = token.partition("@")
    return f"{ident.partition('.')[0]}{at}{node}"
