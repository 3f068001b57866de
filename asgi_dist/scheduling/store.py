"""Where the scheduler keeps its state: the Protocol every backend implements.

A store keeps, per job: the next fire of its sequence, the schedule signature,
the paused flag, the highest leader fence that claimed for it, one claim per
fire, the running lease (overlap), a run lease per unfinished fire (so that a
fire whose node died is recorded ``lost``) and a capped history.  Cluster-wide it keeps
the queue of manual triggers and of one-off fires.

The one step that makes the scheduler correct is :meth:`SchedulerStore.claim`:
it checks the fence, the server clock and the expected next fire, records the
claim, advances the sequence and appends history, all atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "Claim",
    "ClaimResult",
    "ClaimStatus",
    "JobState",
    "SchedulerStore",
]

ClaimStatus = Literal[
    "claimed",  # this node must run the fire
    "missed",  # recorded as missed by the misfire policy; not run
    "skipped",  # overlap=forbid and the previous run holds the running lease
    "paused",  # the job is paused; recorded, not run
    "duplicate",  # another leader already claimed this fire
    "moved",  # the sequence moved on (another leader, or a new schedule)
    "stale",  # a newer leader term has claimed for this job: stop leading
    "early",  # the server clock has not reached the fire yet
]


@dataclass(frozen=True)
class JobState:
    next_ms: int | None
    paused: bool
    fence: int


@dataclass(frozen=True)
class Claim:
    """One fire to claim.  ``expected_next`` is ``None`` for fires outside the sequence."""

    job: str
    fire_ms: int
    fire_id: str
    expected_next: int | None
    new_next: int | None
    advance: bool
    fence: int
    intent: Literal["run", "missed"]
    record: dict[str, Any]
    overlap: str
    lease_ms: int
    claim_ttl_ms: int
    signature: str


@dataclass(frozen=True)
class ClaimResult:
    status: ClaimStatus
    detail: str = ""
    server_ms: int = 0


class SchedulerStore(Protocol):
    """The scheduler's persistence; Redis, PostgreSQL and memory implement it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def now_ms(self) -> int:
        """The server's clock in UTC milliseconds."""
        ...

    async def init_job(self, job: str, signature: str, first_next: int | None) -> JobState:
        """The job's state; a new job or a changed signature starts at ``first_next``."""
        ...

    async def state(self, job: str) -> JobState: ...

    async def claim(self, claim: Claim) -> ClaimResult: ...

    async def finish(self, job: str, fire_id: str, patch: dict[str, Any], *, release: bool) -> None:
        """Merge ``patch`` into the fire's history record; release the running lease if ours."""
        ...

    async def renew(self, job: str, fire_id: str, lease_ms: int) -> bool:
        """Extend the running lease while it still names ``fire_id``."""
        ...

    async def keep_running(self, job: str, fire_id: str, lease_ms: int) -> None:
        """Renew the run lease a claimed fire holds while its node runs it."""
        ...

    async def reap_lost(self, job: str, limit: int = 1000) -> list[str]:
        """Record as ``lost`` the claimed or running fires of ``job`` whose run lease
        expired (their node died or froze); returns their fire ids."""
        ...

    async def history(self, job: str, limit: int) -> list[dict[str, Any]]:
        """Newest first."""
        ...

    async def record(self, job: str, fire_id: str) -> dict[str, Any] | None: ...

    async def set_paused(self, job: str, paused: bool) -> None: ...

    async def push_trigger(self, entry: dict[str, Any]) -> None:
        """Queue a manual fire for whichever node leads, and wake it."""
        ...

    async def pop_triggers(self, limit: int) -> list[dict[str, Any]]: ...

    async def add_once(self, entry: dict[str, Any], at_ms: int) -> None:
        """Queue a one-off fire, and wake the leader."""
        ...

    async def due_once(self, now_ms: int, limit: int) -> list[dict[str, Any]]:
        """One-off fires due at ``now_ms`` (still queued until :meth:`drop_once`)."""
        ...

    async def next_once_ms(self) -> int | None: ...

    async def drop_once(self, entry: dict[str, Any]) -> None: ...

    async def wake(self) -> None:
        """Wake the leader loop (wherever it runs)."""
        ...

    async def wait_wakeup(self, seconds: float) -> bool:
        """Wait for a trigger, one-off or pause (True), or ``seconds`` (False)."""
        ...
