"""SessionManager: the session capability of one Dist, and its request hook.

Per request: read the cookie (no store round trip for a missing or forged
one), load the session (one round trip, none on a near-cache hit), hand it to
the app as ``scope["session"]`` / ``get_session()``, and before the response
starts write only what changed (one round trip, none for a read-only request),
then set the cookie and ``Vary: Cookie``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from asgi_dist._types import Message
from asgi_dist.backends import Runtime
from asgi_dist.context import RequestContext, RequestHook
from asgi_dist.errors import ConfigError, SessionError, SessionTooLarge
from asgi_dist.sessions.config import SessionConfig
from asgi_dist.sessions.cookie import SessionCookie
from asgi_dist.sessions.memory import MemorySessionStore
from asgi_dist.sessions.postgres import MIGRATIONS, PostgresSessionStore
from asgi_dist.sessions.redis import RedisSessionStore
from asgi_dist.sessions.session import Session
from asgi_dist.sessions.store import (
    TOO_LARGE,
    SessionInfo,
    SessionKey,
    SessionStore,
    StoredSession,
    new_session_id,
)

if TYPE_CHECKING:
    from asgi_dist.sessions.nearcache import NearCache

__all__ = ["SessionManager"]

log = logging.getLogger("asgi_dist.sessions")

_ECHO_WAIT = 0.01  # seconds a request waits for its process's own write echo


class SessionManager:
    """Sessions of one Dist: ``dist.sessions``.

    ``await invalidate_user(uid)`` ends every session of a user (logout
    everywhere) and ``await list_user(uid)`` lists them; each is one store round
    trip (on Redis Cluster, one per session).
    """

    def __init__(self, runtime: Runtime, config: SessionConfig, secret_keys: list[str]) -> None:
        self.runtime = runtime
        self.config = config
        self.clash_warned = False  # another middleware's session cookie, told once
        self.backend = config.backend or runtime.default_backend
        if not secret_keys:
            # Dist.check_serving() refuses to serve shared-store sessions without keys;
            # a worker that never serves a request needs none.  On one process with the
            # memory store a random key is as good as any: its sessions die with it.
            secret_keys = [secrets.token_urlsafe(32)]
            log.info("sessions: no secret_keys given; signing with a random per-process key")
        self.secret_keys = secret_keys
        self.cookie = SessionCookie(config, secret_keys)
        self.channel = f"{runtime.namespace}:session:invalidate"
        self.store: SessionStore = self._make_store()
        # The near cache needs the pub/sub hub: imported only when turned on.
        self._near: NearCache | None = None

    def _make_store(self) -> SessionStore:
        if self.backend == "redis":
            redis = self.runtime.require_redis("SessionConfig(backend='redis')")
            return RedisSessionStore(redis, self.config, self.channel)
        if self.config.near_cache:
            raise ConfigError(
                "SessionConfig(near_cache=True) needs the Redis session store (its writes "
                "publish invalidations): configure Dist(redis=...) or turn near_cache off"
            )
        if self.backend == "postgres":
            postgres = self.runtime.require_postgres("SessionConfig(backend='postgres')")
            return PostgresSessionStore(postgres, self.config, self.runtime)
        return MemorySessionStore(self.config)

    # lifecycle -----------------------------------------------------------------

    def register(self) -> None:
        if isinstance(self.store, PostgresSessionStore):
            self.store.backend.register_migrations("sessions", MIGRATIONS)

    async def start(self) -> None:
        await self.store.start()
        if self.config.near_cache:
            from asgi_dist.sessions.nearcache import NearCache

            self._near = NearCache(self.config, self.channel)
            await self._near.start(self.runtime.pubsub)

    async def stop(self) -> None:
        if self._near is not None:
            self._near.stop()
            self._near = None
        await self.store.stop()

    def request_hook(self) -> RequestHook | None:
        return _SessionHook(self)

    @property
    def near_cache(self) -> NearCache | None:
        """The near cache of this process (``hits``/``misses``), or ``None``."""
        return self._near

    # per request ---------------------------------------------------------------

    async def _load(self, key: SessionKey, min_version: int) -> tuple[StoredSession | None, int]:
        """The stored session, and the near-cache tick its state is current as of."""
        near = self._near
        if near is None:
            return await self.store.load(key), -1
        handle = key.handle
        if handle in near:
            # Yield once before serving a copy: an invalidation that reached this
            # process together with the request is then read first (its reader task
            # is already queued), so the request sees a write acknowledged before it.
            await asyncio.sleep(0)
        elif near.echo_pending(handle):
            # This process wrote the session last and the same script that answered the
            # save published its echo, so the echo is normally in the socket already:
            # waiting for the reader to put the copy back saves this load's round trip
            # (a client writing in a loop).  Bounded: past it, load as usual.
            await near.wait_echo(handle, _ECHO_WAIT)
        stamp = near.stamp()
        stored = near.get(handle, min_version)
        if stored is not None:
            return stored, stamp
        loop = asyncio.get_running_loop()
        started = loop.time()
        stored = await self.store.load(key)
        if stored is not None:
            # The store's ttl as of now, at least (it answered after ``started``): the
            # copy kept here, or after this request's write, never outlives the session.
            stored.ttl = max(0.0, stored.ttl - (loop.time() - started))
            near.put(handle, stored, stamp)
        return stored, stamp

    async def open(self, ctx: RequestContext) -> Session:
        """The request's session: loaded if the cookie is valid and the store knows it."""
        session_id, resign, version = self.cookie.read(ctx.scope)
        stored, stamp = (
            await self._load(SessionKey.of(session_id), version) if session_id else (None, -1)
        )
        session = Session(self, session_id, stored, max_size=self.config.max_size)
        session.near_stamp = stamp
        if self._near is not None:
            session.loaded_at = asyncio.get_running_loop().time()
        session.had_cookie = session_id is not None
        session.resign = resign and stored is not None
        return session

    async def commit(self, session: Session, headers: list[tuple[bytes, bytes]] | None,
                     scope: Any) -> None:  # fmt: skip
        """Write what the request changed; add the cookie headers if ``headers`` is given."""
        cookie_needed = session.regenerated or session.resign
        if session.is_new:
            if session.has_content:
                full = session.full_delta()
                sent = asyncio.get_running_loop().time()
                version = await self.store.create(session.key, full)
                if not version:
                    raise SessionError("a new session id collided with a stored one; retry")
                session.mark_saved(full)
                session.version = version
                if self._near is not None:
                    # Its timeouts started when the store ran the create, after ``sent``.
                    ttl = min(self.config.idle_timeout, self.config.absolute_timeout)
                    ttl -= asyncio.get_running_loop().time() - sent
                    self._near.created(session.key.handle, self._stored_view(session, ttl))
                cookie_needed = True
            else:
                if session.invalidated and session.had_cookie and headers is not None:
                    headers.append(self.cookie.expire_header(scope))
                return  # nothing to store: no cookie for an empty session
        else:
            delta = session.delta() if session.may_have_changed else None
            if delta:
                near = self._near
                if near is not None:
                    delta.tag = near.tag()
                    near.sending(delta.tag)
                try:
                    version = await self.store.save(session.key, delta)
                except BaseException:
                    if near is not None:
                        near.unsent(delta.tag)
                    raise
                handle = session.key.handle
                if version == TOO_LARGE:
                    if near is not None:
                        near.unsent(delta.tag)
                    raise SessionTooLarge(
                        f"this request's changes would make the stored session over "
                        f"max_size={self.config.max_size} bytes, together with what concurrent "
                        "requests stored meanwhile; nothing of this request was stored: keep "
                        "large data elsewhere and put its id in the session, or raise "
                        "SessionConfig(max_size=...)"
                    )
                if not version:
                    if near is not None:
                        near.unsent(delta.tag)
                        near.drop(handle)
                    # Ended (logout elsewhere, expiry) or regenerated while this request ran:
                    # it stays ended, and writes through an old id are never forwarded to
                    # the new one (that would hand a fixated id the logged-in session).
                    # No cookie is expired either: the browser may hold the new id by now.
                    log.info("session ended or moved while a request changed it; changes dropped")
                    return
                session.mark_saved(delta)
                session.version = version
                if near is not None:
                    # The cookie carries the version, so that this client's next request
                    # is never served an older copy by any node (read-your-writes).
                    cookie_needed = True
                    if session.regenerated:
                        near.drop(handle)
                    else:
                        # Loaded state + delta is the stored state unless another write
                        # crossed: the near cache checks that when the echo comes back.
                        view = self._stored_view(session, self._ttl_after_save(session))
                        near.saved(handle, delta.tag, view, session.near_stamp)
            elif not session.regenerated:
                cookie_needed = False  # re-sign with the newest key on the next write only
        if cookie_needed and headers is not None:
            version = session.version if self._near is not None else 0
            headers.append(self.cookie.set_header(session.id, scope, version))
            session.resign = False

    def follow_store(self, session: Session, headers: list[tuple[bytes, bytes]],
                     scope: Any) -> None:  # fmt: skip
        """The cookie of a request that failed (5xx), which writes nothing: it still
        follows what the store did already (``regenerate()``, ``invalidate()``), or the
        browser would be left holding an id that is gone."""
        if session.regenerated and not session.is_new:
            version = session.version if self._near is not None else 0
            headers.append(self.cookie.set_header(session.id, scope, version))
        elif session.invalidated and session.had_cookie:
            headers.append(self.cookie.expire_header(scope))

    def _ttl_after_save(self, session: Session) -> float:
        """At least how long the store keeps ``session`` after this request's write
        (and perhaps no longer): the write refreshed the idle timeout, not the absolute
        one, which ends no sooner than the ttl as loaded (or, for a session this
        request created, the absolute timeout) less the time since the load."""
        elapsed = asyncio.get_running_loop().time() - session.loaded_at
        origin = session.origin
        bound = origin.ttl if origin is not None else self.config.absolute_timeout
        return min(self.config.idle_timeout, bound - elapsed)

    def _stored_view(self, session: Session, ttl: float) -> StoredSession:
        """What the store holds after this request's write, as this request knows it,
        ``ttl`` seconds from now at least."""
        origin = session.origin
        if origin is not None:
            created, last_access = origin.created, origin.last_access
        else:
            created = last_access = time.time()  # informational only
        return StoredSession(
            dict(session.stored_fields),
            session.stored_user_id,
            created,
            last_access,
            ttl,
            version=session.version,
        )

    async def regenerate(self, session: Session) -> None:
        if session.is_new:
            session.mark_regenerated(new_session_id())
            return
        if session.moved:
            # A copy kept readable for the grace period of an earlier regenerate: it is
            # never moved again (that would make a stale id live on); start afresh.
            session.mark_fresh(keep_changes=True)
            session.mark_regenerated(session.id)
            return
        old = session.key
        new_id = new_session_id(shard=old.shard)
        moved = await self.store.regenerate(old, SessionKey.of(new_id), session.stored_user_id)
        if self._near is not None:
            self._near.drop(old.handle)
        if not moved:
            # The old session ended meanwhile: this request's view becomes a new session.
            session.mark_unstored()
        session.mark_regenerated(new_id)

    async def invalidate(self, session: Session) -> None:
        if not session.is_new:
            ended = await self.store.delete(session.key, session.stored_user_id)
            if self._near is not None:
                for handle in ended:
                    self._near.drop(handle)
        session.mark_invalidated()

    # administration ------------------------------------------------------------

    async def invalidate_user(self, user_id: str | int) -> int:
        """End every session of ``user_id`` (logout everywhere); returns how many ended."""
        handles = await self.store.invalidate_user(str(user_id))
        if self._near is not None:
            # The published invalidations reach this process too, but later than the
            # next line of the caller: drop the local copies now.
            for handle in handles:
                self._near.drop(handle)
        return len(handles)

    async def list_user(self, user_id: str | int) -> list[SessionInfo]:
        """The live sessions of ``user_id`` (handles and times, never their ids)."""
        return await self.store.list_user(str(user_id))


class _SessionHook:
    """Opens the session on request, commits it before the response starts."""

    __slots__ = ("manager",)

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    async def on_request(self, ctx: RequestContext) -> None:
        session = await self.manager.open(ctx)
        ctx.session = session
        ctx.scope["session"] = session

    def check_response(self, ctx: RequestContext) -> None:
        # Encoded and size-checked before the request's transaction commits: a
        # session that cannot be stored fails the request with nothing written.
        if ctx.session is not None:
            ctx.session.prepare()

    async def on_response_start(self, ctx: RequestContext, message: Message) -> None:
        session = ctx.session
        if session is None:
            return
        added: list[tuple[bytes, bytes]] = []
        if message["type"] == "http.response.start" and message.get("status", 200) >= 500:
            # The request failed (an unhandled error, or the app said so): like its
            # transaction, its changes are dropped, not half of them kept.
            self.manager.follow_store(session, added, ctx.scope)
        else:
            await self.manager.commit(session, added, ctx.scope)
        session.committed = True
        # A websocket's session is saved again when it ends; an HTTP one never.
        session.sealed = ctx.scope["type"] == "http"
        self._check_cookie_clash(ctx, session, message)
        if session.accessed or added:
            added.append((b"vary", b"Cookie"))
            message["headers"] = [*(message.get("headers") or ()), *added]

    def _check_cookie_clash(self, ctx: RequestContext, session: Session, message: Message) -> None:
        """Warn (once) when another middleware uses our cookie name or replaced the
        session in the scope: both sessions would then break, with no error."""
        if self.manager.clash_warned:
            return
        prefix = f"{self.manager.config.cookie_name}=".encode().lower()
        theirs = any(
            name.lower() == b"set-cookie" and value.lower().startswith(prefix)
            for name, value in message.get("headers") or ()
        )
        if theirs or ctx.scope.get("session") is not session:
            self.manager.clash_warned = True
            log.warning(
                "another middleware (Starlette's SessionMiddleware?) uses the session cookie "
                "%r or replaced scope['session']: both sessions break; give one of them another "
                "cookie name (SessionConfig(cookie_name=...)) and keep request.session for one",
                self.manager.config.cookie_name,
            )

    async def on_response_end(self, ctx: RequestContext) -> None:
        return None

    async def on_finish(self, ctx: RequestContext, error: BaseException | None) -> None:
        session = ctx.session
        # A websocket's session may change after the handshake: save it (no cookie).
        if (
            session is not None
            and error is None
            and ctx.scope["type"] == "websocket"
            and session.committed
        ):
            await self.manager.commit(session, None, ctx.scope)
