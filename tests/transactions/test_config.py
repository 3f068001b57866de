"""Configuration is validated where it enters, with errors that name the value and the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asgi_dist import ConfigError, Dist
from asgi_dist.transactions import Message, Transaction, TransactionConfig, transactional


@pytest.mark.parametrize(
    "kwargs",
    [
        {"relay_batch": 0},
        {"relay_batch": 1.5},
        {"retention": -1},
        {"relay": "yes"},
        {"retry_backoff": 2.0, "retry_backoff_max": 1.0},
        {"claim_interval": 20.0},
        {"max_checks": True},
    ],
)
def test_bad_transaction_config_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="TransactionConfig"):
        TransactionConfig(**kwargs)


@pytest.mark.parametrize(
    ("name", "value", "valid"),
    [
        ("reclaim_after", float("nan"), "seconds more than 0 and at most 86400"),
        ("relay_lease", float("inf"), "seconds more than 0 and at most 86400"),
        ("retry_backoff_max", float("inf"), "seconds more than 0 and at most 86400"),
        ("inbox_retention", float("nan"), "seconds more than 0"),
        ("stream_maxlen", 1.5, "an integer from 1 to"),
        ("relay_batch", 10**9, "an integer from 1 to 100,000"),
    ],
)
def test_non_finite_or_fractional_config_is_refused_naming_option_and_range(
    name: str, value: float, valid: str
) -> None:
    with pytest.raises(ConfigError, match=f"TransactionConfig.*{name}=") as raised:
        TransactionConfig(**{name: value})
    assert valid in str(raised.value)


async def test_bad_transactional_message_timings_are_refused(
    make_dist: Callable[..., Any],
) -> None:
    dist: Dist = await make_dist(sessions=False)

    async def check(message: Message) -> bool:
        return True

    for name in ("check_after", "check_interval"):
        for value in (float("nan"), float("inf"), 0, -1):
            with pytest.raises(ConfigError, match=f"{name}={value!r} is invalid: use a number"):
                dist.transactional_message("orders", {}, check=check, **{name: value})


async def test_bad_consumer_registrations_are_refused(make_dist: Callable[..., Any]) -> None:
    dist: Dist = await make_dist(start=False)

    async def handler(message: Message, tx: Transaction) -> None:
        return None

    def not_async(message: Message, tx: Transaction) -> None:
        return None

    with pytest.raises(ConfigError, match="group"):
        dist.consumer("orders", group="bad group")(handler)
    with pytest.raises(ConfigError, match="topic"):
        dist.consumer("{orders}", group="g")(handler)
    with pytest.raises(ConfigError, match="async def"):
        dist.consumer("orders", group="g")(not_async)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_deliveries"):
        dist.consumer("orders", group="g", max_deliveries=0)(handler)
    for timeout in (0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="finite number of seconds"):
            dist.consumer("orders", group="g", timeout=timeout)(handler)
    dist.consumer("orders", group="g")(handler)
    with pytest.raises(ConfigError, match="already registered"):
        dist.consumer("orders", group="g")(handler)


def test_bad_endpoint_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="isolation"):
        transactional(isolation="snapshot")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="deferrable"):
        transactional(deferrable=True)
    with pytest.raises(ConfigError, match="rollback_on"):
        transactional(rollback_on="500")  # type: ignore[arg-type]
    for status in (-1, 999):
        with pytest.raises(ConfigError, match=f"rollback_on={status} is not a status"):
            transactional(rollback_on=status)
    with pytest.raises(ConfigError, match="readonly='yes'"):
        transactional(readonly="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("missing", ["redis", "postgres"])
async def test_a_consumer_without_redis_or_postgres_is_refused_where_it_is_declared(
    make_dist: Callable[..., Any], missing: str
) -> None:
    dist: Dist = await make_dist(start=False, **{missing: None})

    async def handler(message: Message, tx: Transaction) -> None:
        return None

    with pytest.raises(ConfigError, match="Redis" if missing == "redis" else "PostgreSQL"):
        dist.consumer("orders", group="g")(handler)
