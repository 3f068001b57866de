"""When a job fires: cron (5 or 6 fields), fixed interval, one-off.

Every schedule answers one question, ``next_after(ms)``: the first fire strictly
after an instant, as integer UTC milliseconds.  Integer instants make fire ids
(``{job}:{ms}``) identical on every node, so two leaders computing the same
schedule name the same fire and the claim can deduplicate it.

DST policy for cron in a time zone (wall-clock semantics, like Vixie cron and
Quartz): a local time that does not exist (the spring-forward gap) fires at the
same wall distance after the gap opens, i.e. shifted forward by the gap; a local
time that exists twice (the fall-back repeat) fires once, at its first
occurrence.  A daily job therefore fires exactly once per civil day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterBadCronError, CroniterBadDateError, CroniterError

from asgi_dist.errors import ConfigError

__all__ = [
    "CronSchedule",
    "IntervalSchedule",
    "OnceSchedule",
    "Schedule",
    "parse_zone",
    "to_ms",
]

_FIELDS_5 = ("minute", "hour", "day of month", "month", "day of week")
_FIELDS_6 = ("second", *_FIELDS_5)
_RANGES = {
    "second": "0-59",
    "minute": "0-59",
    "hour": "0-23",
    "day of month": "1-31",
    "month": "1-12 or jan-dec",
    "day of week": "0-6 (0 is Sunday) or sun-sat",
}

# The nicknames of Vixie cron, as the 5-field expressions they stand for.
_NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Bound on candidates examined for one answer: a seconds-level schedule walks at
# most one repeated DST hour (3,600 candidates) before it leaves it.
_MAX_CANDIDATES = 10_000


def to_ms(moment: datetime) -> int:
    """An aware datetime as integer UTC milliseconds."""
    return int(moment.timestamp() * 1000)


def parse_zone(tz: str) -> ZoneInfo:
    if not isinstance(tz, str):
        raise ConfigError(f"tz={tz!r} must be an IANA zone name such as 'Europe/Berlin'")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"tz={tz!r} is not a known IANA time zone: use a name such as 'UTC' or "
            "'Europe/Berlin' (install the tzdata package if the system has no zone files)"
        ) from None


class Schedule(Protocol):
    """The fire times of a job."""

    def next_after(self, ms: int) -> int | None:
        """The first fire strictly after ``ms`` (UTC ms), or ``None`` if there is none."""
        ...

    def describe(self) -> str:
        """A stable text form; a change of it resets the stored next fire."""
        ...


class CronSchedule:
    """A cron expression of 5 fields, or 6 with seconds first, in an IANA time zone."""

    def __init__(self, expression: str, tz: str = "UTC") -> None:
        if not isinstance(expression, str):
            raise ConfigError(f"cron expression {expression!r} must be a string")
        if expression.strip().startswith("@"):
            nickname = expression.strip().lower()
            if nickname not in _NICKNAMES:
                raise ConfigError(
                    f"cron expression {expression!r} is not a known nickname: use one of "
                    f"{', '.join(_NICKNAMES)}, or 5 fields (minute hour day-of-month month "
                    "day-of-week); for a single run use dist.scheduler.at(...)"
                )
            expression = _NICKNAMES[nickname]
        fields = expression.split()
        if len(fields) not in (5, 6):
            raise ConfigError(
                f"cron expression {expression!r} has {len(fields)} fields: use 5 "
                "(minute hour day-of-month month day-of-week) or 6 with seconds first"
            )
        self.expression = " ".join(fields)
        self.tz = tz
        self.zone = parse_zone(tz)
        self._seconds = len(fields) == 6
        _validate_fields(fields)
        # The expression as a whole can still never match (e.g. 30 February).
        if self.next_after(to_ms(datetime(2000, 1, 1, tzinfo=UTC))) is None:
            raise ConfigError(f"cron expression {expression!r} never fires: check its day fields")

    def describe(self) -> str:
        return f"cron:{self.expression}@{self.tz}"

    def next_after(self, ms: int) -> int | None:
        instant = datetime.fromtimestamp(ms / 1000, UTC)
        wall = instant.astimezone(self.zone).replace(tzinfo=None)
        try:
            it = croniter(self.expression, wall, second_at_beginning=self._seconds)
            for _ in range(_MAX_CANDIDATES):
                candidate: datetime = it.get_next(datetime)
                fire = to_ms(self._resolve(candidate))
                # During a repeated hour the wall clock runs behind: candidates
                # whose first occurrence is already past are skipped, so an
                # ambiguous time fires once.
                if fire > ms:
                    return fire
        except (CroniterBadDateError, CroniterError):
            return None
        return None

    def _resolve(self, wall: datetime) -> datetime:
        # fold=0 picks the first occurrence of an ambiguous time; for a time in
        # the gap it applies the offset in force before the gap, which lands
        # the same wall distance after the gap opens (02:30 -> 03:30 CEST).
        return wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)


def _validate_fields(fields: list[str]) -> None:
    """Try each field alone in an otherwise all-``*`` expression, to name the bad one."""
    names = _FIELDS_6 if len(fields) == 6 else _FIELDS_5
    for index, (name, value) in enumerate(zip(names, fields, strict=True)):
        probe = ["*"] * len(fields)
        probe[index] = value
        try:
            croniter(" ".join(probe), second_at_beginning=len(fields) == 6)
        except (CroniterBadCronError, CroniterError, ValueError, KeyError):
            raise ConfigError(
                f"cron field {name!r} = {value!r} is invalid in {' '.join(fields)!r}: use "
                f"{_RANGES[name]}, with '*', ',', '-' and '/'; the fields are {', '.join(names)}"
            ) from None


@dataclass(frozen=True)
class IntervalSchedule:
    """Every ``period_ms``, aligned to the UNIX epoch plus ``offset_ms``.

    Alignment (rather than "period after the last run") is what lets any leader
    compute the same fire ids after a failover.
    """

    period_ms: int
    offset_ms: int = 0

    def describe(self) -> str:
        return f"every:{self.period_ms}ms+{self.offset_ms}"

    def next_after(self, ms: int) -> int | None:
        k = (ms - self.offset_ms) // self.period_ms + 1
        return k * self.period_ms + self.offset_ms


@dataclass(frozen=True)
class OnceSchedule:
    """A single fire at ``at_ms``."""

    at_ms: int

    def describe(self) -> str:
        return f"once:{self.at_ms}"

    def next_after(self, ms: int) -> int | None:
        return self.at_ms if self.at_ms > ms else None


def interval(seconds: float, *, offset: float = 0.0) -> IntervalSchedule:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise ConfigError(f"every(seconds={seconds!r}) must be a positive number of seconds")
    if seconds < 0.01:
        raise ConfigError(f"every(seconds={seconds!r}) is below the 10 ms resolution")
    if not isinstance(offset, int | float) or not 0 <= offset < seconds:
        raise ConfigError(f"offset={offset!r} must be between 0 and seconds={seconds!r}")
    return IntervalSchedule(round(seconds * 1000), round(offset * 1000))


def period_after(schedule: Schedule, fire_ms: int) -> int | None:
    """The gap from ``fire_ms`` to the following fire (for jitter caps and claim TTLs)."""
    following = schedule.next_after(fire_ms)
    return None if following is None else following - fire_ms


def utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
