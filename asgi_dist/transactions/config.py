"""TransactionConfig: outbox, relay, consumer and check-back options, validated once."""

from __future__ import annotations

from dataclasses import dataclass, fields

from asgi_dist.errors import ConfigError

__all__ = ["TransactionConfig"]


@dataclass(frozen=True)
class TransactionConfig:
    """Options of the transaction capability (``Dist(transactions=TransactionConfig(...))``).

    Every duration is in seconds.

    Args:
        enabled: turn the whole capability off (no request transaction, no workers).
        relay: run the outbox relay in this process (it runs in every process by default;
            relays share the work).
        relay_batch: rows relayed per claim.
        relay_poll_interval: polling fallback when no ``NOTIFY`` arrives.
        relay_lease: lease of a claimed outbox partition; a relay paused longer than this
            loses it and cannot mark the rows it had claimed.
        stream_maxlen: approximate cap of every topic stream (``XADD MAXLEN ~``); ``None``
            keeps everything.
        retention: published outbox rows are purged after this long.
        inbox_retention: consumer inbox rows (the dedup memory) are purged after this long;
            keep it longer than any redelivery can take.
        purge_interval: how often the purge job runs (one node per fire; each process when
            its scheduler is off).
        max_payload: bound on the JSON payload of one message, in bytes.
        reclaim_after: a pending message whose consumer stopped heartbeating for this long
            is claimed by another consumer of the group (``XAUTOCLAIM``).
        claim_interval: how often each consumer looks for reclaimable or retryable messages.
        retry_backoff: first delay before a failed message is delivered again; doubles per
            attempt up to ``retry_backoff_max``.
        check_after: first check-back of a transactional message left undecided (RocketMQ: 6 s).
        check_interval: delay between later check-backs (RocketMQ: 60 s).
        max_checks: check-backs before an undecided message is discarded (RocketMQ: 15).
        check_timeout: bound on one ``check()`` call; it is also the claim of the check.
        check_poll_interval: how often the check-back job looks for due half messages.
        acquire_timeout: bound on taking a PostgreSQL connection for a request transaction.
    """

    enabled: bool = True
    relay: bool = True
    relay_batch: int = 500
    relay_poll_interval: float = 1.0
    relay_lease: float = 10.0
    stream_maxlen: int | None = 1_000_000
    retention: float = 86_400.0
    inbox_retention: float = 7 * 86_400.0
    purge_interval: float = 60.0
    max_payload: int = 256 * 1024
    reclaim_after: float = 10.0
    claim_interval: float = 0.25
    retry_backoff: float = 0.5
    retry_backoff_max: float = 30.0
    check_after: float = 6.0
    check_interval: float = 60.0
    max_checks: int = 15
    check_timeout: float = 10.0
    check_poll_interval: float = 1.0
    acquire_timeout: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("enabled", "relay"):
                if not isinstance(value, bool):
                    raise ConfigError(
                        f"TransactionConfig({f.name}={value!r}) must be True or False"
                    )
                continue
            if f.name == "stream_maxlen" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(
                    f"TransactionConfig({f.name}={value!r}) is invalid: use a positive number"
                )
        for name in ("relay_batch", "max_checks", "max_payload"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"TransactionConfig({name}=...) must be an integer")
        if self.retry_backoff_max < self.retry_backoff:
            raise ConfigError(
                f"TransactionConfig(retry_backoff_max={self.retry_backoff_max!r}) is below "
                f"retry_backoff={self.retry_backoff!r}: raise it"
            )
        if self.claim_interval >= self.reclaim_after:
            raise ConfigError(
                f"TransactionConfig(claim_interval={self.claim_interval!r}) must be shorter "
                f"than reclaim_after={self.reclaim_after!r}"
            )
