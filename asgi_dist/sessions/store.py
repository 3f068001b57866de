"""The store protocol every session backend implements, and the records it speaks.

A session lives in the store under a *key* derived from a hash of its id, so a
dump of the store does not reveal a live cookie.  The id starts with a short
*shard* that ``regenerate()`` keeps: the old and the new key then share one
Redis Cluster slot and the move is one atomic script.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from asgi_dist.backends import as_backend_unavailable
from asgi_dist.errors import BackendUnavailable

__all__ = [
    "TOO_LARGE",
    "SessionDelta",
    "SessionInfo",
    "SessionKey",
    "SessionStore",
    "StoredSession",
    "fields_size",
    "new_session_id",
    "store_outage",
    "user_digest",
]

SHARD_LENGTH = 2  # 4096 shards: spreads sessions over Cluster slots
# What save() returns when the merged session would be over max_size.
TOO_LARGE = -1
_ID = re.compile(r"[A-Za-z0-9_-]{46}")


def new_session_id(shard: str | None = None) -> str:
    """A fresh id: a shard (kept by ``regenerate``) plus 264 random bits."""
    random_part = secrets.token_urlsafe(33)  # 44 characters, 264 bits
    return (shard or secrets.token_urlsafe(2)[:SHARD_LENGTH]) + random_part


def is_session_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def _digest(value: str) -> str:
    raw = hashlib.sha256(value.encode()).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def user_digest(user_id: str) -> str:
    """The user's index name: a hash, so that any user id is a safe key part."""
    return _digest("user:" + user_id)


def fields_size(fields: dict[str, str]) -> int:
    """A session's size as max_size counts it: keys (UTF-8) plus JSON texts (ASCII)."""
    return sum(len(k.encode()) + len(v) for k, v in fields.items())


def store_outage(
    exc: Exception, where: str, store_timeout: float, connection: Any = None
) -> BackendUnavailable | None:
    """The :class:`BackendUnavailable` (503 in a request) that a failed store call
    stands for, or ``None`` when ``exc`` is no outage.  Raised as such, an outage
    reaches every framework's handler of the documented error, and callers outside a
    request (``invalidate_user`` in a script) see what failed."""
    outage = as_backend_unavailable(exc, connection)
    if outage is None or outage is exc:
        return outage
    if type(exc) is TimeoutError:  # our own store_timeout bound (paused, overloaded)
        return BackendUnavailable(
            f"the session store ({where}) did not answer within store_timeout="
            f"{store_timeout:g} s; retry shortly (or raise SessionConfig(store_timeout=...))"
        )
    return BackendUnavailable(
        f"the session store ({where}) is unavailable ({type(exc).__name__}: {exc}); retry shortly"
    )


@dataclass(frozen=True, slots=True)
class SessionKey:
    """Where a session lives in the store; derived from, and not revealing, its id."""

    shard: str
    digest: str

    @classmethod
    def of(cls, session_id: str) -> SessionKey:
        return _key_of(session_id)

    @property
    def handle(self) -> str:
        """One string naming the session in indexes, listings and invalidation messages."""
        return f"{self.shard}.{self.digest}"

    @classmethod
    def from_handle(cls, handle: str) -> SessionKey:
        shard, _, digest = handle.partition(".")
        return cls(shard, digest)


@functools.lru_cache(maxsize=10_000)
def _key_of(session_id: str) -> SessionKey:
    # Hot sessions skip the SHA-256 (ids are random: the cache cannot be steered).
    return SessionKey(session_id[:SHARD_LENGTH], _digest(session_id))


@dataclass(slots=True)
class StoredSession:
    """A session as loaded: the JSON text of each value, and its metadata."""

    fields: dict[str, str]
    user_id: str | None
    created: float  # server time, seconds since the epoch
    last_access: float
    ttl: float  # seconds the store keeps it at least without another access
    moved: bool = False  # regenerated: readable during the grace period only
    version: int = 0  # writes so far (Redis); the near cache compares it with the cookie's


@dataclass(slots=True)
class SessionDelta:
    """What one request changed: only these fields are written."""

    set: dict[str, str] = field(default_factory=dict)  # key -> JSON text
    delete: list[str] = field(default_factory=list)
    user_changed: bool = False
    user_id: str | None = None  # the new user id when user_changed
    previous_user_id: str | None = None  # to drop the session from the old user's index
    tag: str = ""  # names this write in its invalidation message (near cache echo)

    def __bool__(self) -> bool:
        return bool(self.set or self.delete or self.user_changed)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One live session of a user, as ``list_user`` returns it (never its id)."""

    handle: str
    user_id: str
    created: float
    last_access: float


class SessionStore(Protocol):
    """Where sessions live: Redis, PostgreSQL or this process's memory."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def load(self, key: SessionKey) -> StoredSession | None:
        """One round trip: the session, refreshing its idle timeout at most every tenth."""

    async def create(self, key: SessionKey, delta: SessionDelta) -> int:
        """Store a new session holding ``delta``: its version (>= 1), 0 if the key exists."""

    async def save(self, key: SessionKey, delta: SessionDelta) -> int:
        """Apply only ``delta`` to a stored session: its new version (>= 1), 0 when it
        is gone (expired, invalidated or regenerated meanwhile: never resurrect it), or
        :data:`TOO_LARGE`, changing nothing, when ``delta`` sets something and the stored
        session with it applied would be over ``max_size`` (concurrent requests each grew
        it).  A delta that only deletes is never refused: it shrinks the session, even one
        stored over a ``max_size`` lowered since."""

    async def regenerate(self, old: SessionKey, new: SessionKey, user_id: str | None) -> bool:
        """Move the data to ``new`` atomically; ``old`` stays readable for the grace period."""

    async def delete(self, key: SessionKey, user_id: str | None) -> list[str]:
        """End the session (logout) and the ids it was regenerated from, which stay
        readable for the grace period otherwise; returns the handles ended."""

    async def list_user(self, user_id: str) -> list[SessionInfo]: ...

    async def invalidate_user(self, user_id: str) -> list[str]:
        """End every live session of the user; returns their handles."""
