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

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterBadCronError, CroniterBadDateError, CroniterError

from asgi_dist._checks import seconds
from asgi_dist.errors import ConfigError

__all__ = [
    "MAX_PERIOD",
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
# The longest interval, and the farthest ahead a one-off may be set: ten years keeps
# every fire time, claim TTL (2 periods) and history timestamp inside a datetime and
# a PostgreSQL bigint of milliseconds.
MAX_PERIOD = 10 * 365 * 86_400.0
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
        _refuse_reversed_ranges(name, value, fields)


_BOUNDS = {
    "second": (0, 59),
    "minute": (0, 59),
    "hour": (0, 23),
    "day of month": (1, 31),
    "month": (1, 12),
    "day of week": (0, 6),
}
_NAMES = {
    **{m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun"), 1)},
    **{m: i for i, m in enumerate(("jul", "aug", "sep", "oct", "nov", "dec"), 7)},
    **{d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
}
_RANGE = re.compile(r"([0-9a-z]+)-([0-9a-z]+)(/[0-9]+)?")


def _refuse_reversed_ranges(name: str, value: str, fields: list[str]) -> None:
    """A range runs low to high, as in Vixie cron and POSIX.  croniter would read
    ``22-2`` as wrapping around; that lax reading is refused so that an expression
    means the same here as in every other cron (write the wrap as two ranges)."""
    for part in value.lower().split(","):
        match = _RANGE.fullmatch(part)
        if match is None:
            continue
        low, high = (_NAMES.get(b, int(b) if b.isdigit() else -1) for b in match.group(1, 2))
        if low > high >= 0:
            first, last = _BOUNDS[name]
            step = match.group(3) or ""
            wrapped = f"{_span(low, last, step)},{_span(first, high, step)}"
            raise ConfigError(
                f"cron field {name!r} = {value!r} has the reversed range {part!r} in "
                f"{' '.join(fields)!r}: a range runs from low to high ({first}-{last}); "
                f"for one that wraps around write both parts, e.g. {wrapped!r}"
            )


def _span(low: int, high: int, step: str) -> str:
    return str(low) if low == high else f"{low}-{high}{step}"


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


def interval(every: float, *, offset: float = 0.0) -> IntervalSchedule:
    every = seconds(every, "every(seconds)", open_low=True)
    if every > MAX_PERIOD:
        raise ConfigError(
            f"every(seconds={every!r}) exceeds the longest interval, {MAX_PERIOD:.0f} s "
            "(10 years): use cron for calendar schedules, or at() for a single run"
        )
    if every < 0.01:
        raise ConfigError(f"every(seconds={every!r}) is below the 10 ms resolution")
    offset = seconds(offset, "every(offset)")
    if offset >= every:
        raise ConfigError(f"every(offset={offset!r}) must be below seconds={every!r}")
    return IntervalSchedule(round(every * 1000), round(offset * 1000))


def period_after(schedule: Schedule, fire_ms: int) -> int | None:
    """The gap from ``fire_ms`` to the following fire (for jitter caps and claim TTLs)."""
    following = schedule.next_after(fire_ms)
    return None if following is None else following - fire_ms


def utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
