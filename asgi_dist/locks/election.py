"""Leader election: one leader per name across every process, with fenced terms.

``async with election.leadership() as term:`` waits until this process leads.
A term is a lease renewed every ``retry`` seconds; if no renewal succeeds for
``renew_deadline`` seconds the leader steps down by itself (``term.lost`` is
set, the body is cancelled, :class:`~asgi_dist.LockLost` is raised) before its
lease of ``ttl`` seconds can expire on the server, so two leaders never overlap
as long as clocks advance at similar rates.  ``term.fence`` increases with every
term: stores that check it reject a deposed leader's late writes.

Leaving the block resigns at once and the release wakes the followers through
the backend's push channel (Redis pub/sub), so a clean hand-over takes one or
two round trips instead of a ttl.  The defaults follow Kubernetes' leader
election (15 s / 10 s / 2 s) scaled to ``Dist(leader_ttl=...)``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from asgi_dist._checks import seconds
from asgi_dist.errors import ConfigError, LockLost, LockTimeout
from asgi_dist.locks.backend import LeaseBackend
from asgi_dist.locks.lease import Held, Watchdog, acquire_lease, new_token

__all__ = ["Election", "Term", "election_timings"]

log = logging.getLogger("asgi_dist.locks")

KIND = "election"


class Term(Held):
    """One leadership term: ``fence`` (strictly increasing), ``lost``, ``owner``."""


def election_timings(
    leader_ttl: float, ttl: float | None, renew_deadline: float | None, retry: float | None
) -> tuple[float, float, float]:
    """Fill defaults from ``leader_ttl`` and validate ``ttl > renew_deadline > 1.2 * retry``."""
    ttl = seconds(leader_ttl if ttl is None else ttl, "ttl", open_low=True, high=86400)
    renew_deadline = seconds(
        ttl * 2 / 3 if renew_deadline is None else renew_deadline, "renew_deadline", open_low=True
    )
    retry = seconds(ttl * 2 / 15 if retry is None else retry, "retry", open_low=True)
    if not (ttl > renew_deadline > 1.2 * retry > 0):
        raise ConfigError(
            f"election timings ttl={ttl:g}, renew_deadline={renew_deadline:g}, retry={retry:g} "
            "are invalid: they must satisfy ttl > renew_deadline > 1.2 * retry > 0 (the leader "
            "must give up before its lease expires, after several renewal attempts), e.g. "
            "ttl=15, renew_deadline=10, retry=2"
        )
    return ttl, renew_deadline, retry


class Election:
    """Campaign for leadership of ``name``; build it with ``dist.election(name)``."""

    def __init__(
        self,
        *,
        backend: LeaseBackend,
        name: str,
        node_id: str,
        watchdog: Watchdog,
        ttl: float,
        renew_deadline: float,
        retry: float,
        terms: dict[tuple[int, str], set[Term]] | None = None,
    ) -> None:
        self.backend = backend
        self.name = name
        self.node_id = node_id
        self.ttl = ttl
        self.renew_deadline = renew_deadline
        self.retry = retry
        self._watchdog = watchdog
        # Live terms of this name in this process, shared by every Election
        # object of the same service, so is_leader does not depend on which
        # object asks; a name's entry lasts only while it has a live term.
        self._shared = terms if terms is not None else {}
        self._key = (id(backend), name)

    def _forget(self, term: Held) -> None:
        terms = self._shared.get(self._key)
        if terms is not None:
            terms.discard(term)
            if not terms:
                del self._shared[self._key]

    def __repr__(self) -> str:
        return f"<Election {self.name!r} backend={self.backend.name} leader={self.is_leader}>"

    @property
    def is_leader(self) -> bool:
        """Whether this process holds a live term of this election right now."""
        terms = self._shared.get(self._key, ())
        return any(not t.lost.is_set() and not t.released for t in terms)

    async def leader(self) -> str | None:
        """The node id of the current leader (any process), or None."""
        token = await self.backend.holder(KIND, self.name)
        return None if token is None else token.partition("@")[2]

    async def try_lead(self) -> Term | None:
        """One attempt: a :class:`Term` (call ``await term.release()`` to resign) or None."""
        try:
            return await self._campaign(timeout=0)
        except LockTimeout:
            return None

    async def campaign(self, timeout: float | None = None) -> Term:  # noqa: ASYNC109
        """Wait until this process leads (``timeout=None``: forever); the caller resigns."""
        return await self._campaign(timeout=timeout)

    @asynccontextmanager
    async def leadership(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 (the contract's name)
    ) -> AsyncIterator[Term]:
        """Lead for the duration of the block; resign on leaving it."""
        term = await self._campaign(timeout=timeout)
        async with term:
            yield term

    async def run(self, body: Callable[[Term], Awaitable[Any]]) -> None:
        """Lead and run ``body(term)``, campaigning again after every lost term.

        Returns when ``body`` returns while leading (resigning); a lost term is
        logged and followed by a new campaign.
        """
        while True:
            try:
                async with self.leadership() as term:
                    await body(term)
                return
            except LockLost as exc:
                log.warning("leadership of %r lost; campaigning again: %s", self.name, exc)
                await asyncio.sleep(self.retry)

    async def _campaign(self, *, timeout: float | None) -> Term:  # noqa: ASYNC109
        self._watchdog.check_running(KIND, self.name)
        token = new_token(self.node_id)
        attempt = await acquire_lease(
            self.backend,
            KIND,
            self.name,
            token=token,
            ttl=self.ttl,
            # A follower sleeps until a resignation wakes it or the leader's
            # lease would have expired (one attempt per lease period while the
            # leader renews), not every ``retry``.
            timeout=timeout,
        )
        term = Term(
            backend=self.backend,
            kind=KIND,
            name=self.name,
            token=attempt.token or token,
            fence=attempt.fence,
            ttl=self.ttl,
            renew_every=self.retry,
            renew_deadline=self.renew_deadline,
            watchdog=self._watchdog,
            renewed_at=attempt.renewed_at,
        )
        self._shared.setdefault(self._key, set()).add(term)
        term.on_end(self._forget)
        log.info("%s leads %r (term %d)", self.node_id, self.name, term.fence)
        return term
