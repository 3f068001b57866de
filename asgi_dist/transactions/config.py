"""TransactionConfig: outbox, relay, consumer and check-back options, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from asgi_dist._checks import seconds
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
        relay_batch_bytes: bound on the payload and header bytes of one claim (16 MiB), so
            that a backlog of large messages is relayed in several batches instead of one
            that holds hundreds of megabytes in memory at once; a claim takes at least one
            row of each partition it leases, whatever its size.
        relay_poll_interval: polling fallback when no ``NOTIFY`` arrives.
        relay_lease: lease of a claimed outbox partition; a relay paused longer than this
            loses it and cannot mark the rows it had claimed.
        stream_maxlen: approximate cap of every topic stream (``XADD MAXLEN ~``); ``None``
            keeps everything.  Entries trimmed before a consumer group read them are lost to
            it: keep this well above the largest backlog.
        retention: published outbox rows are purged after this long.
        inbox_retention: consumer inbox rows (the dedup memory) are purged after this long;
            keep it longer than any redelivery can take.  A consumer group that existed and
            is found missing is recreated at the entries of this last period.
        purge_interval: how often the purge job runs (one node per fire; each process when
            its scheduler is off).
        max_payload: bound on the JSON payload of one message, in bytes (and on its headers).
        reclaim_after: a pending message whose consumer stopped heartbeating for this long
            is claimed by another consumer of the group (``XAUTOCLAIM``).
        claim_interval: how often each consumer looks for reclaimable or retryable messages.
        retry_backoff: first delay before a failed message is delivered again; doubles per
            attempt up to ``retry_backoff_max``.  A retry due later than ``reclaim_after``
            waits in the process where the message failed; if that process stops, another
            consumer retries it after ``reclaim_after``.
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
    relay_batch_bytes: int = 16 * 1024 * 1024
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
        for name in ("enabled", "relay"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"TransactionConfig({name}={getattr(self, name)!r}) must be True or False"
                )
        for name, most in _COUNTS.items():
            value = getattr(self, name)
            if name == "stream_maxlen" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ConfigError(
                    f"TransactionConfig({name}={value!r}) is invalid: use an integer from 1 "
                    f"to {most:,}" + (", or None" if name == "stream_maxlen" else "")
                )
        for name, high in _DURATIONS.items():
            # NaN or inf would pass a plain comparison and make the workers fail forever.
            seconds(getattr(self, name), f"TransactionConfig: {name}", open_low=True, high=high)
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


_DAY = 86_400.0
# Upper bounds: finite, and far beyond any sensible setting.
_COUNTS = {
    "relay_batch": 100_000,
    "relay_batch_bytes": 1024 * 1024 * 1024,
    "stream_maxlen": 10**12,
    "max_payload": 512 * 1024 * 1024,  # Redis' limit on one string
    "max_checks": 10_000,
}
_DURATIONS = {
    "relay_poll_interval": _DAY,
    "relay_lease": _DAY,
    "retention": 3650 * _DAY,
    "inbox_retention": 3650 * _DAY,
    "purge_interval": _DAY,
    "reclaim_after": _DAY,
    "claim_interval": _DAY,
    "retry_backoff": _DAY,
    "retry_backoff_max": _DAY,
    "check_after": _DAY,
    "check_interval": _DAY,
    "check_timeout": _DAY,
    "check_poll_interval": _DAY,
    "acquire_timeout": _DAY,
}
