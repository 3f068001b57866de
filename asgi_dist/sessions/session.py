"""The session object a request sees: a mapping of JSON values that records its delta.

Only what a request changed is written back, so two overlapping requests of one
user that change different keys both persist (the same key: last writer wins).
A change is a key set or deleted through the mapping, or a list/dict value
mutated in place (found at save time by comparing its JSON with the loaded one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from asgi_dist.errors import SessionError, SessionTooLarge
from asgi_dist.sessions.store import SessionDelta, SessionKey, StoredSession, new_session_id

if TYPE_CHECKING:
    from asgi_dist.sessions.manager import SessionManager

__all__ = ["Session"]

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_decode = json.loads

# Lists and dicts nested deeper than this are refused where they enter.  Python's json
# encodes and decodes nesting by recursion, within the interpreter's recursion limit
# (1000) less the depth of the stack it runs on: a value that encodes in one place
# (a shallow script) could fail to load in another (deep inside a server's request),
# and a RecursionError then breaks every request of the session.  Far below both.
MAX_DEPTH = 100
_TOO_DEEP = (
    f"is nested more than {MAX_DEPTH} lists/dicts deep; nothing was stored: store flatter "
    "data (or its JSON text as a str), or keep it elsewhere and put its id in the session"
)


def _depth_ok(value: Any, text: str) -> bool:
    """Whether ``value`` (encoded as ``text``) nests at most :data:`MAX_DEPTH` deep."""
    # Each level costs at least one bracket: almost every value is cleared by a count.
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return True
    level: list[tuple[Any, int]] = [(value, 1)]
    while level:
        item, depth = level.pop()
        if depth > MAX_DEPTH:
            return False
        children = item.values() if isinstance(item, dict) else item
        level += [(c, depth + 1) for c in children if isinstance(c, dict | list | tuple)]
    return True


def _size(key: str, text: str) -> int:
    # ensure_ascii (the encoder's default) makes len() the byte count of values.
    return len(key.encode()) + len(text)


def _storable_key(key: str) -> bool:
    """Every store can keep ``key``: PostgreSQL refuses NUL in text, and a lone
    surrogate is not UTF-8 (values may hold both: they are kept as JSON text)."""
    if "\x00" in key:
        return False
    if key.isascii():
        return True
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


class Session(MutableMapping[str, Any]):
    """``request.session`` / ``get_session()``: a ``MutableMapping[str, Any]`` of JSON values.

    ``.id`` is the session id (the secret the cookie carries); ``await .regenerate()``
    gives it a new id with the same data (call it on login: fixation defence);
    ``await .invalidate()`` ends it (logout); ``.user_id = ...`` indexes it under a
    user for ``dist.sessions.invalidate_user()`` / ``list_user()``.
    """

    __slots__ = (
        "_accessed",
        "_deleted",
        "_dirty",
        "_id",
        "_in_store",
        "_invalidated",
        "_manager",
        "_max_size",
        "_prepared",
        "_raw",
        "_regenerated",
        "_size",
        "_stored_user_id",
        "_user_changed",
        "_user_id",
        "_values",
        "committed",
        "had_cookie",
        "loaded_at",
        "moved",
        "near_stamp",
        "origin",
        "resign",
        "sealed",
        "version",
    )

    def __init__(
        self,
        manager: SessionManager | None,
        session_id: str | None = None,
        stored: StoredSession | None = None,
        *,
        max_size: int = 64 * 1024,
    ) -> None:
        self._manager = manager
        self._max_size = max_size
        self._in_store = stored is not None
        self._id = session_id if stored is not None and session_id else new_session_id()
        self._raw: dict[str, str] = stored.fields if stored is not None else {}
        self._values: dict[str, Any] = {k: _decode(v) for k, v in self._raw.items()}
        self._size = -1  # bytes of keys and JSON values; counted when first needed
        self._dirty: dict[str, str] = {}  # key -> new JSON text
        self._deleted: set[str] = set()
        self._prepared: SessionDelta | None = None  # delta() computed ahead, by prepare()
        self._user_id = stored.user_id if stored is not None else None
        self._stored_user_id = self._user_id
        self._user_changed = False
        self._accessed = False
        self._regenerated = False
        self._invalidated = False
        self.resign = False  # the cookie was signed with an older key
        self.had_cookie = False  # the request carried a valid cookie
        self.committed = False  # saved when the response (or websocket) started
        # An HTTP response started: nothing saves the session any more, so a change
        # (from a background task, say) is refused rather than silently lost.
        self.sealed = False
        # A read-only copy left by regenerate() for its grace period: writes are dropped.
        self.moved = stored.moved if stored is not None else False
        self.origin = stored  # its metadata, for the near cache after a save
        self.near_stamp = -1  # near-cache tick when it was loaded
        self.loaded_at = 0.0  # loop time when it was loaded (origin.ttl counts from it)
        self.version = stored.version if stored is not None else 0  # writes so far (Redis)

    # identity -------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The session id; a fresh session has one too, stored on its first write."""
        return self._id

    @property
    def key(self) -> SessionKey:
        return SessionKey.of(self._id)

    @property
    def is_new(self) -> bool:
        """Not in the store (yet): nothing was loaded and nothing saved."""
        return not self._in_store

    @property
    def user_id(self) -> str | None:
        self._accessed = True
        return self._user_id

    @user_id.setter
    def user_id(self, value: str | int | None) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise TypeError(f"session.user_id must be a str, an int or None, not {value!r}")
            value = str(value)
            if not value or len(value) > 512:
                raise SessionError("session.user_id must be 1 to 512 characters long")
        self._accessed = True
        self._check_open()
        if value != self._user_id:
            self._user_id = value
            self._user_changed = value != self._stored_user_id

    async def regenerate(self) -> None:
        """Move the data to a new id in one atomic store step (call it on login).

        The old id stays readable for ``regenerate_grace`` seconds so that parallel
        requests of the same browser do not break; the new cookie is sent with this
        response, after the store confirmed the move.
        """
        if self._manager is None:
            raise SessionError("this session is not attached to a SessionManager")
        self._check_open()
        await self._manager.regenerate(self)

    async def invalidate(self) -> None:
        """Delete the session from the store and expire its cookie (logout).

        Keys set afterwards in the same request start a new session with a new id.
        """
        if self._manager is None:
            raise SessionError("this session is not attached to a SessionManager")
        self._check_open()
        await self._manager.invalidate(self)

    # mapping --------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._accessed = True
        return self._values[key]

    def _check_open(self) -> None:
        if self.sealed:
            raise SessionError(
                "the session was saved when the response started, and this change would "
                "be lost: change the session before returning the response (background "
                "tasks cannot)"
            )

    def __setitem__(self, key: str, value: Any) -> None:
        self._accessed = True
        self._check_open()
        if not isinstance(key, str):
            raise TypeError(f"session keys must be str, not {type(key).__name__} ({key!r})")
        if key not in self._values and not _storable_key(key):
            raise ValueError(
                f"session key {key!r} cannot be stored: keys must be text without NUL "
                "characters or lone surrogates (values may hold them)"
            )
        try:
            text = _encode(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"session[{key!r}] = {type(value).__name__} is not JSON-serialisable ({exc}); "
                "store str, int, float, bool, None, and lists/dicts of them"
            ) from None
        except RecursionError:
            text = ""  # refused just below, with the reason
        if not text or not _depth_ok(value, text):
            raise TypeError(f"session[{key!r}] = {type(value).__name__} {_TOO_DEEP}")
        # Written even when it equals the value loaded: another request may have
        # changed the key since, and the last writer of a key wins.
        old = self._dirty.get(key, self._raw.get(key)) if key in self._values else None
        size = self._total() - (_size(key, old) if old is not None else 0) + _size(key, text)
        if size > self._max_size:
            raise SessionTooLarge(
                f"session[{key!r}] would make the session {size} bytes, over max_size="
                f"{self._max_size}; nothing was stored: keep large data elsewhere and put "
                "its id in the session, or raise SessionConfig(max_size=...)"
            )
        self._size = size
        self._values[key] = value
        self._dirty[key] = text
        self._deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        self._accessed = True
        self._check_open()
        del self._values[key]
        self._dirty.pop(key, None)
        self._size = -1  # recounted when next needed
        if key in self._raw:
            self._deleted.add(key)

    def _total(self) -> int:
        if self._size < 0:
            self._size = sum(_size(k, self._dirty.get(k) or self._raw[k]) for k in self._values)
        return self._size

    def __iter__(self) -> Iterator[str]:
        self._accessed = True
        return iter(self._values)

    def __len__(self) -> int:
        self._accessed = True
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        self._accessed = True
        return key in self._values

    def __repr__(self) -> str:
        return f"<Session {len(self._values)} keys{' new' if self.is_new else ''}>"

    def clear(self) -> None:
        for key in list(self._values):
            del self[key]

    # bookkeeping for the manager -------------------------------------------------

    @property
    def accessed(self) -> bool:
        """Read or written in this request (the response then varies by Cookie)."""
        return self._accessed

    @property
    def may_have_changed(self) -> bool:
        """Cheap pre-check of :meth:`delta`: false for a plain read-only request."""
        if self._dirty or self._deleted or self._user_changed:
            return True
        return self._accessed and any(isinstance(v, dict | list) for v in self._values.values())

    def prepare(self) -> None:
        """Compute (and so check) what :meth:`delta` will return, before any commit."""
        if self.may_have_changed or (self.is_new and self.has_content):
            self._prepared = self.delta()

    def delta(self) -> SessionDelta:
        """The changes of this request: keys set, keys deleted, in-place mutations."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            return prepared
        changed = dict(self._dirty)
        grown: list[str] = []  # keys changed in place
        if self._accessed:
            for key, value in self._values.items():
                # Only containers can change without __setitem__.
                if isinstance(value, dict | list):
                    try:
                        text = _encode(value)
                    except (TypeError, ValueError) as exc:
                        raise SessionError(
                            f"session[{key!r}] was changed in place to something JSON cannot "
                            f"store ({exc}); nothing was stored: put only str, int, float, "
                            "bool, None, and lists/dicts of them in the session"
                        ) from None
                    except RecursionError:
                        text = ""  # refused just below, with the reason
                    if text == changed.get(key, self._raw.get(key)):
                        continue
                    if not text or not _depth_ok(value, text):
                        raise SessionError(f"session[{key!r}] was changed in place and {_TOO_DEEP}")
                    changed[key] = text
                    grown.append(key)
        if grown:
            size = sum(_size(k, changed.get(k) or self._raw[k]) for k in self._values)
            if size > self._max_size:
                keys = ", ".join(f"session[{k!r}]" for k in grown)
                raise SessionTooLarge(
                    f"the session grew to {size} bytes by changes made in place to {keys}, "
                    f"over max_size={self._max_size}; nothing was stored: keep large data "
                    "elsewhere and put its id in the session, or raise SessionConfig(max_size=...)"
                )
        return SessionDelta(
            set=changed,
            delete=sorted(self._deleted),
            user_changed=self._user_changed,
            user_id=self._user_id,
            previous_user_id=self._stored_user_id,
        )

    def full_delta(self) -> SessionDelta:
        """Everything, for a session not yet in the store."""
        delta = self.delta()
        delta.set = {k: delta.set.get(k) or self._raw[k] for k in self._values}
        delta.delete = []
        delta.user_changed = self._user_id is not None
        delta.previous_user_id = None
        return delta

    def mark_saved(self, delta: SessionDelta) -> None:
        """The store holds ``delta`` now: later deltas are relative to it."""
        for key in delta.delete:
            self._raw.pop(key, None)
        self._raw.update(delta.set)
        self._dirty.clear()
        self._deleted.clear()
        self._stored_user_id = self._user_id
        self._user_changed = False
        self._in_store = True

    def mark_regenerated(self, new_id: str) -> None:
        self._id = new_id
        self._regenerated = True

    def mark_invalidated(self) -> None:
        """Gone from the store; what is set later starts a new session with a new id."""
        self.mark_fresh()
        self._invalidated = True

    def mark_fresh(self, keep_changes: bool = False) -> None:
        """A session with a new id, not in the store: empty, or holding only the keys and
        user this request set."""
        kept = {k: self._values[k] for k in self._dirty} if keep_changes else {}
        user = self._user_id if keep_changes and self._user_changed else None
        self._values.clear()
        self._raw = {}
        self._dirty.clear()
        self._deleted.clear()
        self._size = 0
        self._user_id = self._stored_user_id = None
        self._user_changed = False
        self._in_store = False
        self._regenerated = False
        self.moved = False
        self._id = new_session_id()
        for key, value in kept.items():
            self[key] = value
        if user is not None:
            self.user_id = user

    def mark_unstored(self) -> None:
        """The store lost it meanwhile: the next save creates it from this view."""
        self._in_store = False

    @property
    def has_content(self) -> bool:
        """Something worth storing: a key, or a user."""
        return bool(self._values) or self._user_id is not None

    @property
    def stored_fields(self) -> dict[str, str]:
        """The JSON text of each value as the store holds it (after the last save)."""
        return self._raw

    @property
    def stored_user_id(self) -> str | None:
        """The user the store indexes this session under."""
        return self._stored_user_id

    @property
    def regenerated(self) -> bool:
        return self._regenerated

    @property
    def invalidated(self) -> bool:
        return self._invalidated
