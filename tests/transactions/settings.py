"""Short timings so that retries, reclaims and check-backs happen within a test's budget."""

from asgi_dist.transactions import TransactionConfig

FAST = TransactionConfig(
    relay_poll_interval=0.2,
    reclaim_after=2.0,
    claim_interval=0.1,
    retry_backoff=0.1,
    retry_backoff_max=1.0,
    check_after=0.5,
    check_interval=0.5,
    check_poll_interval=0.2,
    check_timeout=2.0,
    acquire_timeout=2.0,
)
