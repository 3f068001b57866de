"""Redis session store: one hash per session, every operation one Lua script call.

Layout: ``{<ns>:session:<shard>}:<digest>`` is a hash whose fields are the
user's keys (prefixed ``.``) beside the metadata ``created``, ``access`` (server
milliseconds), ``uid``, ``moved`` and ``prev`` (the handle it was regenerated from,
which a logout ends too); its TTL enforces both timeouts.  The user
index ``{<ns>:session_user:<hash of uid>}`` is a set of session handles, pruned
whenever it is read (no keyspace notifications needed).

On Redis Cluster a session and its user index live in different slots, so index
updates and ``list_user``/``invalidate_user`` take extra round trips there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from asgi_dist.backends.redis import RedisBackend
from asgi_dist.sessions.config import SessionConfig
from asgi_dist.sessions.store import (
    SessionDelta,
    SessionInfo,
    SessionKey,
    StoredSession,
    store_outage,
    user_digest,
)

__all__ = ["RedisSessionStore"]

_PACKAGE = "asgi_dist.sessions"
_META = {"created", "access", "uid", "moved", "ver"}
_KEY_CACHE = 10_000  # session keys remembered (ids are random: the cache cannot be steered)
T = TypeVar("T")


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisSessionStore:
    """Sessions in Redis (single server, Sentinel or Cluster)."""

    def __init__(self, backend: RedisBackend, config: SessionConfig, channel: str = "") -> None:
        self.backend = backend
        self.config = config
        # The near caches' channel: the end of a session (logout, regenerate, logout
        # everywhere) and a change of its user are published there even by a process
        # that keeps no near cache itself (an admin script, a worker), so that no
        # node serves what ended; other writes only by near-caching processes.
        self.channel = channel
        self._idle = _ms(config.idle_timeout)
        self._absolute = _ms(config.absolute_timeout)
        self._refresh = _ms(config.refresh_interval)
        self._grace = int(config.regenerate_grace * 1000)
        # Constant arguments, encoded once.
        self._load_args = [str(n).encode() for n in (self._idle, self._absolute, self._refresh)]
        self._load = backend.script(_PACKAGE, "load")
        self._save = backend.script(_PACKAGE, "save")
        self._regenerate = backend.script(_PACKAGE, "regenerate")
        self._delete = backend.script(_PACKAGE, "delete")
        self._user_script = backend.script(_PACKAGE, "user_sessions")
        self._keys: dict[SessionKey, str] = {}
        self._prefix = f"{backend.namespace}:session:"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _key(self, key: SessionKey) -> str:
        # Every request of a hot session needs its key: built (and validated) once.
        name = self._keys.get(key)
        if name is None:
            if len(self._keys) >= _KEY_CACHE:
                self._keys.clear()
            name = self._keys[key] = self.backend.key("session", key.shard, key.digest)
        return name

    def _index(self, user_id: str) -> str:
        return self.backend.key("session_user", user_digest(user_id))

    def _outage(self, exc: Exception) -> Exception:
        outage = store_outage(exc, f"Redis at {self.backend.where}", self.config.store_timeout)
        return exc if outage is None else outage

    async def _bounded(self, call: Awaitable[T]) -> T:
        # A paused server must cost a 503, not a hung request.
        try:
            async with asyncio.timeout(self.config.store_timeout):
                return await call
        except Exception as exc:
            outage = self._outage(exc)
            if outage is exc:
                raise
            raise outage from exc

    async def load(self, key: SessionKey) -> StoredSession | None:
        # The hot path: the store_timeout bound inline, one coroutine frame fewer.
        try:
            async with asyncio.timeout(self.config.store_timeout):
                reply = await self._load(self.backend.commands, [self._key(key)], self._load_args)
        except Exception as exc:
            outage = self._outage(exc)
            if outage is exc:
                raise
            raise outage from exc
        if not reply:
            return None
        pttl, flat = json.loads(reply.decode() if isinstance(reply, bytes) else reply)
        fields: dict[str, str] = {}
        meta: dict[str, str] = {}
        for i in range(0, len(flat), 2):
            name, value = flat[i], flat[i + 1]
            if name[:1] == ".":
                fields[name[1:]] = value
            elif name in _META:
                meta[name] = value
        return StoredSession(
            fields=fields,
            user_id=meta.get("uid"),
            created=int(meta.get("created", 0)) / 1000,
            last_access=int(meta.get("access", 0)) / 1000,
            ttl=max(0, int(pttl)) / 1000,
            moved="moved" in meta,
            version=int(meta.get("ver", 0)),
        )

    def _save_call(self, mode: str, key: SessionKey, delta: SessionDelta) -> Awaitable[Any]:
        skey = self._key(key)
        keys = [skey]
        user = ""
        if delta.user_changed:
            user = "=" + (delta.user_id or "") if delta.user_id is not None else "="
            if not self.backend.is_cluster:
                new_index = self._index(delta.user_id) if delta.user_id is not None else skey
                old = delta.previous_user_id
                keys += [new_index, self._index(old) if old is not None else skey]
        pairs: list[str] = []
        for name, text in delta.set.items():
            pairs += ["." + name, text]
        request = [
            mode,
            self._idle,
            self._absolute,
            user,
            self.channel if self.config.near_cache or delta.user_changed else "",
            key.handle,
            f"{key.handle} {delta.tag}" if delta.tag else key.handle,
            pairs,
            ["." + name for name in delta.delete],
            self.config.max_size,
            self._prefix,
        ]
        # One JSON argument: packing each field as its own argument costs the client more.
        return self._save(self.backend.commands, keys, [_dumps(request)])

    async def _cluster_index(self, key: SessionKey, delta: SessionDelta) -> None:
        # Cluster: the index is in another slot; a second round trip, on login/logout only.
        if not (self.backend.is_cluster and delta.user_changed):
            return
        client = self.backend.client
        if delta.previous_user_id is not None:
            await self._bounded(client.srem(self._index(delta.previous_user_id), key.handle))
        if delta.user_id is not None:
            index = self._index(delta.user_id)
            await self._bounded(client.sadd(index, key.handle))
            await self._bounded(client.pexpire(index, self._absolute))

    async def create(self, key: SessionKey, delta: SessionDelta) -> int:
        version = int(await self._bounded(self._save_call("new", key, delta)))
        if version > 0:
            await self._cluster_index(key, delta)
        return version

    async def save(self, key: SessionKey, delta: SessionDelta) -> int:
        try:
            async with asyncio.timeout(self.config.store_timeout):
                version = int(await self._save_call("update", key, delta))
        except Exception as exc:
            outage = self._outage(exc)
            if outage is exc:
                raise
            raise outage from exc
        if version > 0:
            await self._cluster_index(key, delta)
        return version

    async def regenerate(self, old: SessionKey, new: SessionKey, user_id: str | None) -> bool:
        keys = [self._key(old), self._key(new)]
        if user_id is not None and not self.backend.is_cluster:
            keys.append(self._index(user_id))
        args = [self._grace, self._idle, self._absolute, self.channel, old.handle, new.handle]
        reply = await self._bounded(self._regenerate(self.backend.commands, keys, args))
        moved = bool(reply == 1)
        if moved and user_id is not None and self.backend.is_cluster:
            # The old handle stays indexed while its copy is readable (regenerate.lua).
            await self._bounded(self.backend.client.sadd(self._index(user_id), new.handle))
        return moved

    async def delete(self, key: SessionKey, user_id: str | None) -> list[str]:
        keys = [self._key(key)]
        if user_id is not None and not self.backend.is_cluster:
            keys.append(self._index(user_id))
        args = [self.channel, key.handle, self._prefix]
        reply = await self._bounded(self._delete(self.backend.commands, keys, args))
        ended = [_text(handle) for handle in reply]
        if user_id is not None and self.backend.is_cluster:
            await self._bounded(self.backend.client.srem(self._index(user_id), *ended))
        return ended

    async def _user_sessions(self, user_id: str, action: str) -> list[SessionInfo]:
        if self.backend.is_cluster:
            return await self._cluster_user_sessions(user_id, action)
        prefix = f"{self.backend.namespace}:session:"
        flat = await self._bounded(
            self._user_script(
                self.backend.commands,
                [self._index(user_id)],
                [action, prefix, user_id, self.channel],
            )
        )
        return [
            SessionInfo(
                handle=flat[i].decode(),
                user_id=user_id,
                created=int(flat[i + 1]) / 1000,
                last_access=int(flat[i + 2]) / 1000,
            )
            for i in range(0, len(flat), 3)
        ]

    async def _cluster_user_sessions(self, user_id: str, action: str) -> list[SessionInfo]:
        client = self.backend.client
        index = self._index(user_id)
        out: list[SessionInfo] = []
        for raw in await self._bounded(client.smembers(index)):
            handle = raw.decode() if isinstance(raw, bytes) else raw
            key = SessionKey.from_handle(handle)
            created, access, uid, moved = await self._bounded(
                client.hmget(self._key(key), ["created", "access", "uid", "moved"])
            )
            if created is None or uid is None or _text(uid) != user_id:
                await self._bounded(client.srem(index, handle))
                continue
            if moved is not None:
                # Regenerated, still readable as this user for the grace period.
                if action == "invalidate":
                    await self.delete(key, None)
                continue
            out.append(SessionInfo(handle, user_id, int(created) / 1000, int(access or 0) / 1000))
            if action == "invalidate":
                await self.delete(key, None)
        if action == "invalidate":
            await self._bounded(client.delete(index))
        return out

    async def list_user(self, user_id: str) -> list[SessionInfo]:
        return await self._user_sessions(user_id, "list")

    async def invalidate_user(self, user_id: str) -> list[str]:
        return [info.handle for info in await self._user_sessions(user_id, "invalidate")]
