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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "Claim",
    "ClaimResult",
    "ClaimStatus",
    "JobState",
    "SchedulerStore",
    "settle_shard",
]

ClaimStatus = Literal[
    "claimed",  # this node must run the fire
    "missed",  # recorded as missed by the misfire policy; not run
    "failed",  # recorded as failed before any start (a one-off the leader cannot import)
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
    intent: Literal["run", "missed", "failed"]
    record: dict[str, Any]
    overlap: str
    lease_ms: int
    claim_ttl_ms: int
    signature: str
    # A one-off's name that no job is registered under: its state and history are
    # forgotten ``retain_ms`` after its last run ended (0: kept, as a job's are).
    retain_ms: int = 0


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

    async def finish(
        self,
        job: str,
        fire_id: str,
        patch: dict[str, Any],
        *,
        release: bool,
        shard: tuple[int, int] | None = None,
    ) -> bool:
        """Merge ``patch`` into the fire's history record, unless it was recorded ``lost``;
        release the running lease if ours.  ``shard=(index, total)``: the outcome of one
        shard of a broadcast, merged as :func:`settle_shard` says.  False if the record
        was left alone (recorded lost, or trimmed)."""
        ...

    async def renew(self, job: str, fire_id: str, lease_ms: int) -> bool:
        """Extend the running lease while it still names ``fire_id``."""
        ...

    async def keep_running(
        self, job: str, fire_id: str, lease_ms: int, *, attempt: int | None = None, node: str = ""
    ) -> bool:
        """Renew the run lease a claimed fire holds while its node runs it; with
        ``attempt``, also record the fire ``running`` that attempt on ``node``, in the
        same step.  False once the fire is not this node's to run: its lease lapsed
        (it is then recorded ``lost``), or it was reaped, or it ended."""
        ...

    async def reap_lost(
        self, job: str, limit: int = 1000, members: Sequence[str] | None = None
    ) -> list[str]:
        """Record as ``lost`` the claimed or running fires of ``job`` whose run lease
        expired (their node died or froze); returns their fire ids.  ``members``: the
        live broadcast members, so that a broadcast fire whose member stopped its
        heartbeat before its shard reported settles (that shard recorded ``lost``;
        one its live member never started, ``abandoned``); ``None`` leaves
        broadcast fires waiting."""
        ...

    async def has_runs(self, job: str) -> bool:
        """Whether any fire of ``job`` still holds a run lease (one reap_lost may find)."""
        ...

    async def track_one_off(self, job: str) -> None:
        """Note, before its claim, that a one-off's name (no job is registered under it)
        has a run: whichever node leads next reaps that name's fires too."""
        ...

    async def one_off_names(self) -> dict[str, float]:
        """The one-off names that may have runs, each with the token of its tracking."""
        ...

    async def untrack_one_off(self, job: str, token: float) -> None:
        """Drop ``job`` from :meth:`one_off_names` unless tracked again since ``token``."""
        ...

    async def forget_retired(self) -> int:
        """Forget the one-off names (claimed with ``retain_ms``) whose runs all ended
        longer than their retention ago; returns how many records went.  (Redis lets
        such keys expire by themselves.)"""
        ...

    async def history(self, job: str, limit: int) -> list[dict[str, Any]]:
        """Newest first."""
        ...

    async def record(self, job: str, fire_id: str) -> dict[str, Any] | None: ...

    async def set_paused(self, job: str, paused: bool) -> None: ...

    async def push_trigger(self, entry: dict[str, Any]) -> None:
        """Queue a manual fire for whichever node leads, and wake it."""
        ...

    async def due_triggers(self, limit: int) -> list[dict[str, Any]]:
        """Queued manual fires, oldest first (still queued until :meth:`drop_trigger`:
        a leader that fails before its claim leaves them to the next pass or leader)."""
        ...

    async def drop_trigger(self, entry: dict[str, Any]) -> None: ...

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


def settle_shard(record: dict[str, Any], index: int, total: int, patch: dict[str, Any]) -> bool:
    """Merge one broadcast shard's outcome into the fire's ``record`` (``finish.lua`` and
    ``settle.lua`` do the same on Redis): under ``shards[str(index)]``, once (a shard
    already recorded keeps its outcome; one its member started is ``running`` until
    then), and once all ``total`` have an outcome, the fire's own status: ``succeeded``
    if every shard succeeded, else ``failed`` if any failed, else the status of the
    lowest shard that did not succeed.  False if the shard's outcome was recorded
    already (the record is left alone)."""
    shards = record.setdefault("shards", {})
    before = shards.get(str(index))
    if before is not None and before.get("status") != "running":
        return False
    shards[str(index)] = patch
    record["shard_total"] = total
    reported = [
        (i, shards[str(i)])
        for i in range(total)
        if str(i) in shards and shards[str(i)].get("status") != "running"
    ]
    if len(reported) < total:
        return True
    record["attempt"] = max((int(s.get("attempt") or 0) for _, s in reported), default=0)
    unhappy = [(i, s) for i, s in reported if s.get("status") != "succeeded"]
    failed = [(i, s) for i, s in unhappy if s.get("status") == "failed"]
    if not unhappy:
        record["status"], record["error"] = "succeeded", None
        return True
    pick, shard = (failed or unhappy)[0]
    record["status"] = shard.get("status")
    record["error"] = f"shard {pick} of {total}: {shard.get('error') or shard.get('status')}"
    return True
