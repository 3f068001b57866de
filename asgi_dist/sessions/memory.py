"""The embedded session store: the Redis semantics, for one process, in a dict.

Expiry is checked on access against ``time.monotonic()``, and a sweep on each
create bounds the memory held by abandoned sessions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from asgi_dist.sessions.config import SessionConfig
from asgi_dist.sessions.store import (
    TOO_LARGE,
    SessionDelta,
    SessionInfo,
    SessionKey,
    StoredSession,
    fields_size,
)

__all__ = ["MemorySessionStore"]


@dataclass(slots=True)
class _Entry:
    fields: dict[str, str]
    created: float  # monotonic
    access: float
    expires: float
    wall_created: float
    wall_access: float
    user_id: str | None = None
    moved: bool = False
    previous: str | None = None  # the handle it was regenerated from


class MemorySessionStore:
    """Sessions in this process only (the embedded default)."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._sessions: dict[str, _Entry] = {}
        self._users: dict[str, set[str]] = {}
        self._next_sweep = 0.0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._sessions.clear()
        self._users.clear()

    def _live(self, handle: str, now: float) -> _Entry | None:
        entry = self._sessions.get(handle)
        if entry is not None and (
            entry.expires <= now or entry.created + self.config.absolute_timeout <= now
        ):
            self._drop(handle)
            return None
        return entry

    def _drop(self, handle: str) -> None:
        entry = self._sessions.pop(handle, None)
        if entry is not None and entry.user_id is not None:
            self._users.get(entry.user_id, set()).discard(handle)

    def _touch(self, entry: _Entry, now: float) -> None:
        entry.access = now
        entry.wall_access = time.time()
        entry.expires = min(
            now + self.config.idle_timeout, entry.created + self.config.absolute_timeout
        )

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.config.refresh_interval
        for handle in [h for h, e in self._sessions.items() if e.expires <= now]:
            self._drop(handle)

    async def load(self, key: SessionKey) -> StoredSession | None:
        now = time.monotonic()
        entry = self._live(key.handle, now)
        if entry is None:
            return None
        if not entry.moved and now - entry.access >= self.config.refresh_interval:
            self._touch(entry, now)
        return StoredSession(
            fields=dict(entry.fields),
            user_id=entry.user_id,
            created=entry.wall_created,
            last_access=entry.wall_access,
            ttl=entry.expires - now,
            moved=entry.moved,
        )

    def _apply(self, handle: str, entry: _Entry, delta: SessionDelta) -> None:
        for name in delta.delete:
            entry.fields.pop(name, None)
        entry.fields.update(delta.set)
        if delta.user_changed:
            if entry.user_id is not None:
                self._users.get(entry.user_id, set()).discard(handle)
            entry.user_id = delta.user_id
            if delta.user_id is not None:
                self._users.setdefault(delta.user_id, set()).add(handle)

    async def create(self, key: SessionKey, delta: SessionDelta) -> int:
        now = time.monotonic()
        self._sweep(now)
        if self._live(key.handle, now) is not None:
            return 0
        wall = time.time()
        entry = _Entry({}, now, now, 0.0, wall, wall)
        self._touch(entry, now)
        self._sessions[key.handle] = entry
        self._apply(key.handle, entry, delta)
        return 1

    async def save(self, key: SessionKey, delta: SessionDelta) -> int:
        now = time.monotonic()
        entry = self._live(key.handle, now)
        if entry is None or entry.moved:
            return 0
        # Only a request that sets something can be refused (as on Redis): one that
        # only deletes shrinks the session, even one stored over a max_size lowered since.
        if delta.set:
            merged = {k: v for k, v in entry.fields.items() if k not in delta.delete}
            if fields_size(merged | delta.set) > self.config.max_size:
                return TOO_LARGE
        self._touch(entry, now)
        self._apply(key.handle, entry, delta)
        return 1

    async def regenerate(self, old: SessionKey, new: SessionKey, user_id: str | None) -> bool:
        now = time.monotonic()
        entry = self._live(old.handle, now)
        if entry is None or entry.moved:
            return False
        moved = _Entry(
            dict(entry.fields),
            entry.created,
            now,
            0.0,
            entry.wall_created,
            time.time(),
            entry.user_id,
            previous=old.handle,
        )
        self._touch(moved, now)
        self._sessions[new.handle] = moved
        if entry.user_id is not None:
            self._users.setdefault(entry.user_id, set()).add(new.handle)
        if self.config.regenerate_grace > 0:
            # Readable as this user for the grace period, as on Redis and PostgreSQL;
            # still indexed, so that invalidate_user ends it too.
            entry.moved = True
            entry.expires = min(entry.expires, now + self.config.regenerate_grace)
        else:
            self._drop(old.handle)
        return True

    async def delete(self, key: SessionKey, user_id: str | None) -> list[str]:
        # The ids it was regenerated from end too: each stays readable, as the same
        # user, for its grace period (as on Redis and PostgreSQL).
        ended = [key.handle]
        previous = self._sessions[key.handle].previous if key.handle in self._sessions else None
        self._drop(key.handle)
        while previous is not None and len(ended) <= 100:
            entry = self._sessions.get(previous)
            if entry is None or not entry.moved:
                break
            self._drop(previous)
            ended.append(previous)
            previous = entry.previous
        return ended

    async def list_user(self, user_id: str) -> list[SessionInfo]:
        now = time.monotonic()
        out = []
        for handle in sorted(self._users.get(user_id, set())):
            entry = self._live(handle, now)
            if entry is not None and entry.user_id == user_id and not entry.moved:
                out.append(SessionInfo(handle, user_id, entry.wall_created, entry.wall_access))
        return out

    async def invalidate_user(self, user_id: str) -> list[str]:
        sessions = await self.list_user(user_id)
        for handle in list(self._users.get(user_id, ())):
            self._drop(handle)  # regenerated copies in their grace period too
        self._users.pop(user_id, None)
        return [info.handle for info in sessions]
