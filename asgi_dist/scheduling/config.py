"""SchedulerConfig: the scheduler's options, validated where they enter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from asgi_dist.errors import ConfigError

__all__ = ["SchedulerConfig"]


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

    def __post_init__(self) -> None:
        if self.backend not in (None, "redis", "postgres", "memory"):
            raise ConfigError(
                f"SchedulerConfig(backend={self.backend!r}): use 'redis', 'postgres' or 'memory'"
            )
        for name in ("history_limit", "run_all_limit", "max_catchup", "max_deliveries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SchedulerConfig({name}={value!r}) must be an integer >= 1")
        for name in (
            "shutdown_grace",
            "running_lease",
            "retry_backoff",
            "retry_backoff_max",
            "dependency_wait",
            "claim_ttl",
            "redeliver_after",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"SchedulerConfig({name}={value!r}) must be seconds >= 0")
        if self.redeliver_after < 0.1:
            raise ConfigError(
                f"SchedulerConfig(redeliver_after={self.redeliver_after!r}) must be at least "
                "0.1 s (a healthy node starts a received fire within milliseconds)"
            )
        if self.running_lease < 1:
            raise ConfigError(
                f"SchedulerConfig(running_lease={self.running_lease!r}) must be at least 1 s"
            )
