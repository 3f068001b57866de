"""SchedulerConfig: the scheduler's options, validated where they enter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from asgi_dist._checks import seconds
from asgi_dist.errors import ConfigError

__all__ = ["SchedulerConfig"]

_DAY = 86_400.0
# (option, lowest, highest seconds): every bound finite, so that no duration
# overflows a server's millisecond field or sleeps forever.
_DURATIONS = (
    ("shutdown_grace", 0.0, _DAY),
    ("running_lease", 1.0, _DAY),  # renewed every third of it: shorter is all renewals
    ("retry_backoff", 0.0, _DAY),
    ("retry_backoff_max", 0.0, _DAY),
    ("dependency_wait", 0.0, 7 * _DAY),
    ("claim_ttl", 0.0, 7 * _DAY),  # a minimum: it also outlives two periods of the job
    # A healthy node starts a received fire within milliseconds.
    ("redeliver_after", 0.1, _DAY),
    ("one_off_retention", 1.0, 366 * _DAY),
)


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler options (validated here; deep code trusts them).

    Args:
        enabled: ``False`` keeps this process from leading and running jobs; it can
            still trigger, pause, resume and read history.
        backend: ``"redis"``, ``"postgres"`` or ``"memory"``; default the Dist's first.
        history_limit: history records kept per job (oldest trimmed); on PostgreSQL a
            fire's row is also its claim and stays until ``claim_ttl``, but ``history()``
            returns at most this many.
        shutdown_grace: seconds running jobs get at stop before they are cancelled.
        running_lease: seconds of the overlap lease, renewed every third of it.
        retry_backoff: base of the exponential backoff between attempts.
        retry_backoff_max: cap of one backoff.
        run_all_limit: with ``misfire="run_all"``, the newest late fires that still run.
        max_catchup: fires handled per job per leader pass (bounds one pass).
        dependency_wait: seconds a child waits for its parents' run of the same fire.
        claim_ttl: minimum seconds a fire's claim is kept (it also outlives 2 periods + 60 s).
        redeliver_after: seconds a ``run_on="any"`` fire may wait, received but not
            started, in a node's pending list before the leader hands it to another
            node (the receiver died or froze).  Redelivery never starts a fire twice.
        max_deliveries: deliveries of such a fire before it is recorded ``abandoned``.
        one_off_retention: seconds the store keeps the state and history of a one-off's
            name (``at(..., name=...)``) that no job is registered under, counted from
            the end of its last run; then they are forgotten, so that distinct names
            do not grow the store.
    """

    enabled: bool = True
    backend: Literal["redis", "postgres", "memory"] | None = None
    history_limit: int = 1000
    shutdown_grace: float = 5.0
    running_lease: float = 30.0
    retry_backoff: float = 0.5
    retry_backoff_max: float = 60.0
    run_all_limit: int = 10
    max_catchup: int = 100
    dependency_wait: float = 300.0
    claim_ttl: float = 600.0
    redeliver_after: float = 10.0
    max_deliveries: int = 5
    one_off_retention: float = 7 * _DAY

    def __post_init__(self) -> None:
        if self.backend not in (None, "redis", "postgres", "memory"):
            raise ConfigError(
                f"SchedulerConfig(backend={self.backend!r}): use 'redis', 'postgres' or 'memory'"
            )
        for name in ("history_limit", "run_all_limit", "max_catchup", "max_deliveries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SchedulerConfig({name}={value!r}) must be an integer >= 1")
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"SchedulerConfig: enabled={self.enabled!r} must be True or False")
        for name, low, high in _DURATIONS:
            seconds(getattr(self, name), f"SchedulerConfig: {name}", low=low, high=high)
