"""Bad input is refused where it enters, with an error naming the value and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from asgi_dist import ConfigError, Dist, SchedulerError
from asgi_dist.scheduling import JobContext, SchedulerConfig


def memory_dist() -> Dist:
    return Dist(sessions=False)


async def job(ctx: JobContext) -> None:
    return None


def test_duplicate_job_names_are_refused() -> None:
    dist = memory_dist()
    dist.every(seconds=1, name="same")(job)
    with pytest.raises(ConfigError, match="'same' is already registered"):
        dist.cron("* * * * *", name="same")(job)


def test_non_async_function_is_refused() -> None:
    dist = memory_dist()

    def sync_job(ctx: Any) -> None:
        return None

    with pytest.raises(ConfigError, match="not an async function"):
        dist.every(seconds=1)(sync_job)  # type: ignore[arg-type]


@pytest.mark.parametrize("seconds", [-1, 0])
def test_negative_or_zero_interval_is_refused(seconds: float) -> None:
    with pytest.raises(ConfigError, match="seconds"):
        memory_dist().every(seconds=seconds)(job)


def test_bad_cron_string_is_refused_at_decoration() -> None:
    with pytest.raises(ConfigError, match="cron field 'hour'"):
        memory_dist().cron("0 24 * * *")(job)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"overlap": "sometimes"}, "overlap"),
        ({"misfire": "later"}, "misfire"),
        ({"retries": -1}, "retries"),
        ({"timeout": 0}, "timeout"),
        ({"jitter": -1}, "jitter"),
        ({"jitter": float("nan")}, "jitter=nan"),
        ({"timeout": float("nan")}, "timeout=nan"),
        ({"timeout": float("inf")}, "timeout=inf"),
        ({"timeout": 1e12}, r"timeout=1000000000000.0 is invalid: .* at most 604800"),
        ({"jitter": 1e9}, r"jitter=1000000000.0 is invalid: .* at most 86400"),
        ({"misfire_grace": 1e300}, "misfire_grace"),
        ({"minutes": float("nan")}, "minutes=nan"),
        ({"offset": float("nan")}, "offset"),
        ({"run_on": "moon"}, "run_on"),
        ({"name": "bad name{}"}, "job name"),
        ({"name": ""}, "job name '' is invalid"),  # not the function's name instead
        ({"after": 5}, "after=5 must be a job name or a list of job names"),
        ({"after": [None]}, "None is not a job name"),
        ({"after": ["bad name"]}, "job name 'bad name' is invalid"),
        ({"broadcast": "yes"}, "broadcast='yes' must be True or False"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        memory_dist().every(seconds=1, **options)(job)


async def test_unknown_parent_is_refused_at_start() -> None:
    dist = memory_dist()
    dist.every(seconds=1, name="child", after=["ghost"])(job)
    with pytest.raises(ConfigError, match="'ghost', which is not registered"):
        await dist.start()


async def test_dependency_cycle_is_refused_at_start() -> None:
    dist = memory_dist()
    dist.every(seconds=1, name="a", after=["c"])(job)
    dist.every(seconds=1, name="b", after=["a"])(job)
    dist.every(seconds=1, name="c", after=["b"])(job)
    with pytest.raises(ConfigError, match="cycle"):
        await dist.start()


def test_self_dependency_is_refused() -> None:
    with pytest.raises(ConfigError, match="after itself"):
        memory_dist().every(seconds=1, name="me", after=["me"])(job)


def test_scheduler_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="history_limit"):
        SchedulerConfig(history_limit=0)
    with pytest.raises(ConfigError, match="backend"):
        SchedulerConfig(backend="mongo")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"claim_ttl": float("nan")}, "claim_ttl=nan is invalid: .* at least 0 and at most"),
        ({"retry_backoff": float("inf")}, "retry_backoff=inf"),
        ({"retry_backoff_max": float("inf")}, "retry_backoff_max=inf"),
        ({"running_lease": float("inf")}, "running_lease=inf"),
        ({"running_lease": 0.5}, "running_lease=0.5 is invalid: .* at least 1"),
        ({"shutdown_grace": float("nan")}, "shutdown_grace=nan"),
        ({"dependency_wait": 1e12}, "dependency_wait"),
        ({"redeliver_after": float("inf")}, "redeliver_after=inf"),
        ({"enabled": "no"}, "enabled='no' must be True or False"),
        ({"enabled": 0}, "enabled=0 must be True or False"),
    ],
)
def test_scheduler_config_refuses_nan_infinite_and_non_bool_values(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        SchedulerConfig(**options)


@pytest.mark.parametrize("seconds", [1e17, 11 * 365 * 86_400])
def test_an_interval_longer_than_ten_years_is_refused(seconds: float) -> None:
    with pytest.raises(ConfigError, match="longest interval, 315360000 s"):
        memory_dist().every(seconds=seconds)(job)
    memory_dist().every(hours=24 * 365 * 9)(job)  # nine years is fine


async def test_operations_on_unknown_jobs_raise_scheduler_error() -> None:
    dist = memory_dist()
    async with dist:
        with pytest.raises(SchedulerError, match="no job named 'nope'"):
            await dist.scheduler.trigger("nope")
        with pytest.raises(SchedulerError):
            await dist.scheduler.pause("nope")


async def test_one_off_function_must_be_importable_and_time_aware() -> None:
    from datetime import datetime

    dist = memory_dist()

    async def local(ctx: JobContext) -> None:
        return None

    async with dist:
        with pytest.raises(ConfigError, match="module-level"):
            await dist.scheduler.at(1.0, local)
        with pytest.raises(ConfigError, match="naive"):
            await dist.scheduler.at(datetime(2030, 1, 1), job)
        for never in (float("inf"), float("nan"), -1):
            with pytest.raises(ConfigError, match="finite number of seconds"):
                await dist.scheduler.at(never, job)


async def test_one_off_more_than_ten_years_ahead_is_refused() -> None:
    from datetime import UTC, datetime

    dist = memory_dist()
    async with dist:
        for far in (1e17, 11 * 365 * 86_400.0, datetime(9000, 1, 1, tzinfo=UTC)):
            with pytest.raises(ConfigError, match="10 years"):
                await dist.scheduler.at(far, job)
        assert await dist.scheduler.at(9 * 365 * 86_400.0, job)


async def test_one_off_defined_in_main_or_nested_is_refused_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    async def reminder(ctx: JobContext) -> None:
        return None

    # As if defined in the script this process runs: importable here, nowhere else.
    reminder.__module__, reminder.__qualname__ = "__main__", "reminder"
    monkeypatch.setattr(sys.modules["__main__"], "reminder", reminder, raising=False)

    async def nested(ctx: JobContext) -> None:
        return None

    dist = memory_dist()
    async with dist:
        with pytest.raises(ConfigError, match=r"defined in __main__.*every node imports"):
            await dist.scheduler.at(1.0, reminder)
        with pytest.raises(ConfigError, match=r"nested or a lambda.*module-level"):
            await dist.scheduler.at(1.0, nested)


async def test_running_after_a_broadcast_job_is_refused(make_dist: Any) -> None:
    dist = await make_dist(start=False, postgres=None, sessions=False)
    dist.every(seconds=1, name="fanout", broadcast=True)(job)
    dist.every(seconds=1, name="after_fanout", after=["fanout"])(job)
    with pytest.raises(ConfigError, match="broadcast fire"):
        await dist.start()


def test_broadcast_and_any_need_redis() -> None:
    dist = Dist(postgres="postgresql://127.0.0.1/unused", sessions=False)
    with pytest.raises(ConfigError, match="Redis Streams"):
        dist.every(seconds=1, run_on="any")(job)
    with pytest.raises(ConfigError, match="overlap"):
        memory_dist().every(seconds=1, broadcast=True, overlap="forbid")(job)
