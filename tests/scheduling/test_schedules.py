"""Fire times, computed rather than waited for: cron fields, intervals, DST policy."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from asgi_dist import ConfigError
from asgi_dist.scheduling.schedules import CronSchedule, IntervalSchedule, interval, to_ms, utc

BERLIN = ZoneInfo("Europe/Berlin")


def fires(
    schedule: CronSchedule | IntervalSchedule, start: datetime, end: datetime
) -> list[datetime]:
    out: list[datetime] = []
    ms = to_ms(start)
    for _ in range(100_000):
        nxt = schedule.next_after(ms)
        if nxt is None or nxt > to_ms(end):
            return out
        out.append(utc(nxt))
        ms = nxt
    raise AssertionError("unbounded schedule walk")


def test_daily_0230_berlin_fires_once_per_civil_day_across_both_2026_transitions() -> None:
    daily = CronSchedule("30 2 * * *", "Europe/Berlin")
    for start, end in (
        (datetime(2026, 3, 26, tzinfo=UTC), datetime(2026, 4, 2, tzinfo=UTC)),  # 29 March
        (datetime(2026, 10, 22, tzinfo=UTC), datetime(2026, 10, 29, tzinfo=UTC)),  # 25 October
    ):
        times = fires(daily, start, end)
        days = Counter(t.astimezone(BERLIN).date() for t in times)
        assert set(days.values()) == {1}, days
        assert len(days) == 7
    # Spring forward: 02:30 does not exist on 29 March; it shifts forward to 03:30 CEST.
    spring = fires(daily, datetime(2026, 3, 29, tzinfo=UTC), datetime(2026, 3, 30, tzinfo=UTC))
    assert [t.astimezone(BERLIN).replace(tzinfo=None) for t in spring] == [
        datetime(2026, 3, 29, 3, 30)
    ]
    # Fall back: 02:30 exists twice on 25 October; it fires once, at the first (CEST).
    fall = fires(daily, datetime(2026, 10, 25, tzinfo=UTC), datetime(2026, 10, 26, tzinfo=UTC))
    assert fall == [datetime(2026, 10, 25, 0, 30, tzinfo=UTC)]


def test_hourly_berlin_job_across_transitions_fires_once_per_wall_hour() -> None:
    hourly = CronSchedule("0 * * * *", "Europe/Berlin")
    spring = fires(
        hourly, datetime(2026, 3, 28, 22, tzinfo=UTC), datetime(2026, 3, 29, 4, tzinfo=UTC)
    )
    walls = [t.astimezone(BERLIN).strftime("%H:%M%z") for t in spring]
    # 02:00 does not exist: it shifts onto 03:00 CEST, which fires once.
    assert walls == [
        "00:00+0100", "01:00+0100", "03:00+0200", "04:00+0200", "05:00+0200", "06:00+0200"
    ]  # fmt: skip
    fall = fires(
        hourly, datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 25, 4, tzinfo=UTC)
    )
    walls = [t.astimezone(BERLIN).strftime("%H:%M%z") for t in fall]
    # 02:00 happens twice: it fires once (first occurrence), never twice.
    assert walls == ["01:00+0200", "02:00+0200", "03:00+0100", "04:00+0100", "05:00+0100"]
    assert len(set(fall)) == len(fall)


def test_daily_job_fires_every_day_of_a_year_exactly_once() -> None:
    daily = CronSchedule("30 2 * * *", "Europe/Berlin")
    times = fires(daily, datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    days = [t.astimezone(BERLIN).date() for t in times]
    assert len(days) == len(set(days)) == 365
    assert days[0] == date(2026, 1, 1) and days[-1] == date(2026, 12, 31)


def test_six_field_cron_has_seconds_first() -> None:
    every5s = CronSchedule("*/5 * * * * *")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert fires(every5s, start, start + timedelta(seconds=20)) == [
        start + timedelta(seconds=s) for s in (5, 10, 15, 20)
    ]


def test_interval_fires_are_aligned_so_every_node_names_the_same_fire() -> None:
    every = interval(1.5)
    assert every.next_after(0) == 1500
    assert every.next_after(1500) == 3000
    assert every.next_after(1499) == 1500
    assert interval(10, offset=3).next_after(0) == 3000


@pytest.mark.parametrize(
    ("expression", "field"),
    [
        ("61 * * * *", "minute"),
        ("* 25 * * *", "hour"),
        ("* * 32 * *", "day of month"),
        ("* * * 13 *", "month"),
        ("* * * * funday", "day of week"),
        ("70 * * * * *", "second"),
    ],
)
def test_bad_cron_field_raises_config_error_naming_the_field_and_its_range(
    expression: str, field: str
) -> None:
    ranges = {"minute": "0-59", "hour": "0-23", "day of month": "1-31", "month": "1-12"}
    ranges |= {"day of week": "sun-sat", "second": "0-59"}
    with pytest.raises(ConfigError, match=f"cron field '{field}'") as info:
        CronSchedule(expression)
    assert ranges[field] in str(info.value)


@pytest.mark.parametrize(
    ("nickname", "fields"),
    [("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@Weekly", "0 0 * * 0")],
)
def test_cron_nicknames_stand_for_their_five_fields(nickname: str, fields: str) -> None:
    assert CronSchedule(nickname).describe() == CronSchedule(fields).describe()


def test_an_unknown_cron_nickname_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="not a known nickname: use one of @yearly"):
        CronSchedule("@fortnightly")


@pytest.mark.parametrize("expression", ["* * * *", "* * * * * * *", ""])
def test_cron_with_wrong_field_count_is_refused(expression: str) -> None:
    with pytest.raises(ConfigError, match="fields"):
        CronSchedule(expression)


def test_cron_that_never_fires_and_unknown_zone_are_refused() -> None:
    with pytest.raises(ConfigError, match="never fires"):
        CronSchedule("0 0 30 2 *")
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        CronSchedule("* * * * *", "Mars/Olympus")


@pytest.mark.parametrize("seconds", [0, -1, -0.5, float("nan") * 0, True])
def test_non_positive_interval_is_refused(seconds: float) -> None:
    with pytest.raises(ConfigError):
        interval(seconds)


@pytest.mark.parametrize(
    ("expression", "field", "fix"),
    [
        ("5-1 * * * *", "minute", "'5-59,0-1'"),
        ("0 22-2 * * *", "hour", "'22-23,0-2'"),
        ("0 0 * nov-feb *", "month", "'11-12,1-2'"),
        ("0 0 * * sat-sun", "day of week", "'6,0'"),
    ],
)
def test_a_reversed_cron_range_is_refused_with_the_wrapped_form(
    expression: str, field: str, fix: str
) -> None:
    # croniter alone would read these as wrapping around; Vixie cron refuses them.
    with pytest.raises(ConfigError, match=f"cron field '{field}' .* reversed range .*{fix}"):
        CronSchedule(expression)
    CronSchedule("0 9-17 * * mon-fri")
