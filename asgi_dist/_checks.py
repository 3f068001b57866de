"""Checks of numeric arguments, shared so that every option says the same thing.

A duration must be a real number (not a bool, not NaN) within its range:
``nan`` would compare false everywhere and wait forever, ``inf`` would overflow
a server's millisecond field, and ``True`` is not a number of seconds.
"""

from __future__ import annotations

import math
from urllib.parse import urlsplit

from asgi_dist.errors import ConfigError

__all__ = ["lease_ttl", "seconds", "shown_url"]


def seconds(
    value: object, what: str, *, low: float = 0.0, high: float = math.inf, open_low: bool = False
) -> float:
    """``value`` as float seconds within ``[low, high]`` (``(low, high]`` with
    ``open_low``), else :class:`ConfigError` naming ``what`` and the range."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or value < low
        or (open_low and value == low)
        or value > high
    ):
        bound = "more than" if open_low else "at least"
        upper = "" if high == math.inf else f" and at most {high:g}"
        raise ConfigError(
            f"{what}={value!r} is invalid: use a number of seconds {bound} {low:g}{upper}"
        )
    return float(value)


def lease_ttl(value: object, what: str = "ttl") -> float:
    """A lease's ttl: 0.01 to 86400 seconds (a lease must end)."""
    return seconds(value, what, low=0.01, high=86400)


def shown_url(url: str) -> str:
    """``url`` as messages may show it: scheme, hosts and path, no credentials, and
    nothing parsed that could fail (a port that is not a number stays as written)."""
    parts = urlsplit(url)
    if not parts.scheme:
        return repr(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
