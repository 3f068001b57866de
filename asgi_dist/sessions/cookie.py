"""The session cookie: an opaque id signed with a key ring, and its attributes.

The cookie carries nothing but the id and its signature (and, with the near
cache, the session's version after the client's last write: ``id:version``, signed
together, so that any node can tell its copy is older than what the client saw).
A client never chooses its id: a cookie that fails the signature is ignored
before any store round trip, and an id the store does not know is replaced with
a fresh one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from itsdangerous import Signer

from asgi_dist._types import Scope
from asgi_dist.sessions.config import SessionConfig
from asgi_dist.sessions.store import is_session_id

__all__ = ["SessionCookie"]

_SALT = "asgi_dist.session"
_VERIFIED_CACHE = 10_000
_MAX_VERSION_DIGITS = 18
_MAX_CANDIDATES = 4  # cookies of our name tried per request


class SessionCookie:
    """Reads, signs and writes the session cookie of one :class:`SessionConfig`."""

    def __init__(self, config: SessionConfig, secret_keys: Sequence[str]) -> None:
        self.config = config
        self.name = config.cookie_key
        self._name_bytes = self.name.encode("latin-1")
        # itsdangerous signs with the *last* key of a ring and accepts all of them;
        # our ring is newest first.
        self._newest = Signer(secret_keys[0], salt=_SALT, digest_method=hashlib.sha256)
        self._ring = (
            Signer(list(reversed(secret_keys)), salt=_SALT, digest_method=hashlib.sha256)
            if len(secret_keys) > 1
            else None
        )
        attrs = [f"Path={config.path}"]
        if config.domain:
            attrs.append(f"Domain={config.domain}")
        attrs += ["HttpOnly", f"SameSite={config.same_site.capitalize()}"]
        if config.partitioned:
            attrs.append("Partitioned")
        self._attrs = "; ".join(attrs)
        self._verified: dict[str, tuple[str, bool, int]] = {}
        max_age = math.ceil(config.absolute_timeout)
        self._max_age = f"; Max-Age={max_age}" if config.persistent else ""

    def read(self, scope: Scope) -> tuple[str | None, bool, int]:
        """``(session id, signed with an older key, version)`` from the request, or
        ``(None, False, 0)``.

        A browser sends every cookie of that name in scope (another app's on a parent
        domain, or one of another path), ours not necessarily first: the first that
        verifies is ours.
        """
        # A few at most: a header stuffed with candidates must not cost an HMAC each.
        for raw in self._find(scope)[:_MAX_CANDIDATES]:
            found = self._verify(raw)
            if found[0] is not None:
                return found
        return None, False, 0

    def _verify(self, raw: str) -> tuple[str | None, bool, int]:
        if len(raw) > self.config.max_cookie_length:
            return None, False, 0  # absurd: ignored unread
        known = self._verified.get(raw)
        if known is not None:
            return known
        value, sep, sig = raw.rpartition(".")
        session_id, colon, version = value.partition(":")
        if not sep or not is_session_id(session_id):
            return None, False, 0
        if colon and not (
            version.isascii() and version.isdigit() and len(version) <= _MAX_VERSION_DIGITS
        ):
            return None, False, 0
        if self._newest.verify_signature(value, sig):
            result = (session_id, False, int(version or 0))
        elif self._ring is not None and self._ring.verify_signature(value, sig):
            # Re-signed with the newest key on the next write.
            result = (session_id, True, int(version or 0))
        else:
            return None, False, 0
        self._remember(raw, result)
        return result

    def _remember(self, raw: str, result: tuple[str, bool, int]) -> None:
        # Only cookies that verified (or that we signed) are remembered, by their whole
        # text, signature included, so a forged one can never hit; a hot session skips
        # the HMAC.
        if len(self._verified) >= _VERIFIED_CACHE:
            self._verified.clear()
        self._verified[raw] = result

    def _find(self, scope: Scope) -> list[str]:
        """The values of every cookie of our name, in the order the browser sent them."""
        prefix = self._name_bytes + b"="
        found: list[str] = []
        for name, value in scope.get("headers", ()):
            if name != b"cookie" or prefix not in value:
                continue
            for part in value.split(b";"):
                part = part.strip()
                if part.startswith(prefix):
                    found.append(part[len(prefix) :].strip(b'"').decode("latin-1"))
        return found

    def _secure(self, scope: Scope) -> bool:
        # Browsers drop a __Host-, Partitioned or SameSite=None cookie without Secure,
        # and a TLS-terminating proxy makes the request plain http here: the session
        # would silently never stick.  (Browsers take Secure cookies from localhost.)
        if self.config.host_prefix or self.config.partitioned or self.config.same_site == "none":
            return True
        if self.config.secure == "auto":
            return scope.get("scheme") in ("https", "wss")
        return bool(self.config.secure)

    def set_header(self, session_id: str, scope: Scope, version: int = 0) -> tuple[bytes, bytes]:
        value = self._newest.sign(f"{session_id}:{version}" if version else session_id).decode()
        # The client sends this text back on its next request: no need to verify it then
        # (with the near cache every write re-sends the cookie with a new version).
        self._remember(value, (session_id, False, version))
        header = f"{self.name}={value}; {self._attrs}{self._max_age}"
        if self._secure(scope):
            header += "; Secure"
        return b"set-cookie", header.encode("latin-1")

    def expire_header(self, scope: Scope) -> tuple[bytes, bytes]:
        header = f"{self.name}=; {self._attrs}; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        if self._secure(scope):
            header += "; Secure"
        return b"set-cookie", header.encode("latin-1")
