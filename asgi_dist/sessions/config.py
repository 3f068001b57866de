"""Session options, validated where they enter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from asgi_dist.errors import ConfigError

__all__ = ["SessionConfig"]

# RFC 6265 cookie-name: an HTTP token.
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
_DOMAIN = re.compile(r"\.?[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_PATH = re.compile(r"/[!#-:<-~]*")  # printable, no ';' (it would end the attribute)


@dataclass(frozen=True)
class SessionConfig:
    """Options of the session capability (``Dist(sessions=SessionConfig(...))``).

    Args:
        cookie_name: name of the cookie (``__Host-`` is prepended when ``host_prefix``).
        idle_timeout: seconds without a request after which the session ends; the store
            refreshes it at most every ``idle_timeout / 10``, so it is enforced to within
            that tenth.
        absolute_timeout: seconds after creation after which the session ends whatever
            its activity (``regenerate()`` keeps the creation time).
        max_size: bound in bytes on the JSON of all keys and values of one session.
        same_site: ``"lax"``, ``"strict"`` or ``"none"`` (``"none"`` always sends
            ``Secure``, as browsers require; ``secure=False`` is refused with it).
        secure: ``"auto"`` sets ``Secure`` on https/wss requests; ``True``/``False`` force it.
        path, domain: cookie scope.
        host_prefix: name the cookie ``__Host-<cookie_name>`` (Secure, Path=/, no Domain):
            a sibling subdomain cannot overwrite it.
        partitioned: add ``Partitioned`` (CHIPS) for third-party embeds.
        persistent: send ``Max-Age=absolute_timeout``; ``False`` makes a browser-session cookie.
        near_cache: keep recently used sessions in this process and let every write
            invalidate the other processes' copies over Redis pub/sub; a read-only request
            on a hot session then makes no store round trip.  Each write re-sends the
            cookie with the session's signed version, and no process serves a client a
            copy older than its cookie (read-your-writes on every node).  Redis only.
        near_cache_size: entries kept per process (least recently used go first).
        near_cache_ttl: longest a cached copy is served without asking the store.
        regenerate_grace: seconds the old id stays readable after ``regenerate()``, so
            that parallel requests of the same browser still carrying it do not break.
        backend: ``"redis"``, ``"postgres"`` or ``"memory"``; default the first configured.
        store_timeout: bound (seconds) on one store operation; past it the request gets a
            503 instead of hanging on a paused server.
        max_cookie_length: cookies longer than this are ignored unread.
    """

    cookie_name: str = "session"
    idle_timeout: float = 14 * 24 * 3600.0
    absolute_timeout: float = 30 * 24 * 3600.0
    max_size: int = 64 * 1024
    same_site: Literal["lax", "strict", "none"] = "lax"
    secure: Literal["auto"] | bool = "auto"
    path: str = "/"
    domain: str | None = None
    host_prefix: bool = False
    partitioned: bool = False
    persistent: bool = True
    near_cache: bool = False
    near_cache_size: int = 10_000
    near_cache_ttl: float = 60.0
    regenerate_grace: float = 10.0
    backend: Literal["redis", "postgres", "memory"] | None = None
    store_timeout: float = 5.0
    max_cookie_length: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.cookie_name, str) or not _COOKIE_NAME.fullmatch(self.cookie_name):
            raise ConfigError(
                f"SessionConfig(cookie_name={self.cookie_name!r}) is not a valid cookie name: "
                "use 1-64 letters, digits or !#$%&'*+-.^_`|~ (RFC 6265 token)"
            )
        _positive("idle_timeout", self.idle_timeout, minimum=1.0)
        _positive("absolute_timeout", self.absolute_timeout, minimum=1.0)
        if self.absolute_timeout < self.idle_timeout:
            raise ConfigError(
                f"SessionConfig(absolute_timeout={self.absolute_timeout!r}) is shorter than "
                f"idle_timeout={self.idle_timeout!r}: the idle timeout would never apply; "
                "make absolute_timeout >= idle_timeout"
            )
        if not isinstance(self.max_size, int) or not 256 <= self.max_size <= 16 * 1024 * 1024:
            raise ConfigError(
                f"SessionConfig(max_size={self.max_size!r}) is invalid: use an int of bytes "
                "from 256 to 16 MiB (default 64 KiB)"
            )
        if self.same_site not in ("lax", "strict", "none"):
            raise ConfigError(
                f"SessionConfig(same_site={self.same_site!r}) is invalid: use 'lax', 'strict' "
                "or 'none'"
            )
        if self.secure not in ("auto", True, False):
            raise ConfigError(
                f"SessionConfig(secure={self.secure!r}) is invalid: use 'auto', True or False"
            )
        if self.same_site == "none" and self.secure is False:
            raise ConfigError(
                "SessionConfig(same_site='none', secure=False): browsers drop SameSite=None "
                "cookies without Secure; use secure=True or 'auto'"
            )
        if not isinstance(self.path, str) or not _PATH.fullmatch(self.path):
            raise ConfigError(
                f"SessionConfig(path={self.path!r}) is invalid: use an absolute path starting "
                "with '/' without ';' or control characters"
            )
        if self.domain is not None and (
            not isinstance(self.domain, str) or not _DOMAIN.fullmatch(self.domain)
        ):
            raise ConfigError(
                f"SessionConfig(domain={self.domain!r}) is invalid: use a host name like "
                "'example.com', or None for a host-only cookie"
            )
        if self.host_prefix:
            if self.domain is not None or self.path != "/" or self.secure is False:
                raise ConfigError(
                    "SessionConfig(host_prefix=True) needs domain=None, path='/' and secure "
                    "'auto' or True: browsers reject __Host- cookies otherwise"
                )
        if self.partitioned and self.secure is False:
            raise ConfigError(
                "SessionConfig(partitioned=True, secure=False): Partitioned cookies must be "
                "Secure; use secure=True or 'auto'"
            )
        if not isinstance(self.near_cache_size, int) or self.near_cache_size < 1:
            raise ConfigError(
                f"SessionConfig(near_cache_size={self.near_cache_size!r}) must be a positive int"
            )
        _positive("near_cache_ttl", self.near_cache_ttl)
        if not isinstance(self.regenerate_grace, int | float) or not (
            0 <= self.regenerate_grace <= 300
        ):
            raise ConfigError(
                f"SessionConfig(regenerate_grace={self.regenerate_grace!r}) is invalid: use 0 "
                "to 300 seconds (default 10)"
            )
        if self.backend not in (None, "redis", "postgres", "memory"):
            raise ConfigError(
                f"SessionConfig(backend={self.backend!r}) is invalid: use 'redis', 'postgres', "
                "'memory' or None (the first configured)"
            )
        _positive("store_timeout", self.store_timeout)
        if not isinstance(self.max_cookie_length, int) or not 64 <= self.max_cookie_length <= 4096:
            raise ConfigError(
                f"SessionConfig(max_cookie_length={self.max_cookie_length!r}) is invalid: "
                "use 64 to 4096"
            )

    @property
    def cookie_key(self) -> str:
        """The cookie's name on the wire."""
        return f"__Host-{self.cookie_name}" if self.host_prefix else self.cookie_name

    @property
    def refresh_interval(self) -> float:
        """Seconds between two refreshes of the idle timeout of one session."""
        return self.idle_timeout / 10


def _positive(name: str, value: object, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        low_ok = False
    else:
        low_ok = value >= minimum if minimum else value > 0
    if not low_ok:
        raise ConfigError(
            f"SessionConfig({name}={value!r}) is invalid: use a number of seconds "
            f"{'of at least ' + format(minimum, 'g') if minimum else 'above 0'}"
        )
