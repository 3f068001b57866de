"""The memory store: the same claim semantics for one process (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from asgi_dist.scheduling.store import Claim, ClaimResult, ClaimStatus, JobState, settle_shard

__all__ = ["MemoryStore"]

_UNFINISHED = ("claimed", "running", "dispatched")


@dataclass
class _Job:
    signature: str = ""
    next_ms: int | None = None
    paused: bool = False
    fence: int = 0
    claims: dict[str, float] = field(default_factory=dict)  # fire_id -> expiry (monotonic)
    running: tuple[str, float] | None = None  # (fire_id, expiry)
    history: dict[str, dict[str, Any]] = field(default_factory=dict)  # insertion = claim order
    retain_ms: int = 0  # a one-off's name: forgotten this long after its last run ended
    retain_until: float | None = None  # monotonic


class MemoryStore:
    def __init__(self, *, history_cap: int) -> None:
        self.history_cap = history_cap
        self._jobs: dict[str, _Job] = {}
        self._triggers: list[dict[str, Any]] = []
        self._once: list[tuple[int, str]] = []
        self._wake = asyncio.Event()
        # Wall time anchored once, advanced by the monotonic clock: the stand-in
        # for a server clock that never jumps.
        self._epoch_ms = time.time() * 1000 - time.monotonic() * 1000

    def _job(self, name: str) -> _Job:
        return self._jobs.setdefault(name, _Job())

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def now_ms(self) -> int:
        return int(self._epoch_ms + time.monotonic() * 1000)

    async def init_job(self, job: str, signature: str, first_next: int | None) -> JobState:
        state = self._job(job)
        state.retain_ms, state.retain_until = 0, None  # a registered job is kept for good
        if state.signature != signature:
            state.signature, state.next_ms = signature, first_next
        return await self.state(job)

    async def state(self, job: str) -> JobState:
        s = self._job(job)
        return JobState(s.next_ms, s.paused, s.fence)

    async def claim(self, claim: Claim) -> ClaimResult:
        s = self._job(claim.job)
        now = await self.now_ms()
        mono = time.monotonic()
        if claim.fence < s.fence:
            return ClaimResult("stale", str(s.fence))
        if claim.signature and s.signature != claim.signature:
            return ClaimResult("moved", str(s.next_ms))
        if claim.fire_ms > now:
            return ClaimResult("early", str(claim.fire_ms - now))
        if claim.expected_next is not None and s.next_ms != claim.expected_next:
            return ClaimResult("moved", str(s.next_ms))
        s.claims = {k: v for k, v in s.claims.items() if v > mono}
        if claim.fire_id in s.claims:
            if claim.advance:
                s.next_ms = claim.new_next
            return ClaimResult("duplicate")
        s.claims[claim.fire_id] = mono + claim.claim_ttl_ms / 1000
        s.fence = claim.fence
        s.retain_ms = claim.retain_ms
        s.retain_until = None
        if claim.retain_ms:
            s.retain_until = mono + (claim.lease_ms + claim.retain_ms) / 1000
            self._forget(mono)
        if claim.advance:
            s.next_ms = claim.new_next
        status: ClaimStatus = "claimed"
        record = dict(claim.record)
        if s.running is not None and s.running[1] <= mono:
            s.running = None
        if claim.intent != "run":
            status = claim.intent
        elif s.paused:
            status, record["error"] = "paused", "the job is paused"
        elif claim.overlap == "forbid":
            if s.running is not None:
                status = "skipped"
                record["error"] = "overlap=forbid: the previous run is still running"
            else:
                s.running = (claim.fire_id, mono + claim.lease_ms / 1000)
        elif claim.overlap == "replace":
            s.running = (claim.fire_id, mono + claim.lease_ms / 1000)
        record["status"], record["claimed_at"] = status, now
        s.history[claim.fire_id] = json.loads(json.dumps(record))
        while len(s.history) > self.history_cap:
            s.history.pop(next(iter(s.history)))
        return ClaimResult(status, str(now), now)

    async def finish(
        self,
        job: str,
        fire_id: str,
        patch: dict[str, Any],
        *,
        release: bool,
        shard: tuple[int, int] | None = None,
    ) -> bool:
        s = self._job(job)
        record = s.history.get(fire_id)
        written = record is not None and record.get("status") != "lost"
        if record is not None and written:
            patch = json.loads(json.dumps(patch))
            if shard is None:
                record.update(patch)
            else:
                written = settle_shard(record, *shard, patch)
        if release and s.running is not None and s.running[0] == fire_id:
            s.running = None
        if s.retain_ms and s.retain_until is not None:
            s.retain_until = max(s.retain_until, time.monotonic() + s.retain_ms / 1000)
        return written

    async def renew(self, job: str, fire_id: str, lease_ms: int) -> bool:
        s = self._job(job)
        if s.running is None or s.running[0] != fire_id:
            return False
        s.running = (fire_id, time.monotonic() + lease_ms / 1000)
        return True

    async def keep_running(
        self, job: str, fire_id: str, lease_ms: int, *, attempt: int | None = None, node: str = ""
    ) -> bool:
        # One process: a fire cannot outlive the node that runs it, so nothing lapses.
        record = self._job(job).history.get(fire_id)
        if record is None:
            return True  # trimmed by the history cap
        if record.get("status") not in ("claimed", "running"):
            return False
        if attempt is not None:
            if record["status"] != "running":
                record["started_at"] = await self.now_ms()
            record.update(status="running", attempt=attempt, node=node)
        return True

    async def reap_lost(
        self, job: str, limit: int = 1000, members: Sequence[str] | None = None
    ) -> list[str]:
        return []

    async def has_runs(self, job: str) -> bool:
        return False  # one process: nothing of it can die apart from the rest

    async def track_one_off(self, job: str) -> None:
        return None  # one process: no other leader to tell

    async def one_off_names(self) -> dict[str, float]:
        return {}

    async def untrack_one_off(self, job: str, token: float) -> None:
        return None

    async def forget_retired(self) -> int:
        return self._forget(time.monotonic())

    def _forget(self, mono: float) -> int:
        """Forget the one-off names whose last run ended more than their retention ago."""
        gone = [
            name
            for name, s in self._jobs.items()
            if s.retain_until is not None
            and s.retain_until < mono
            and all(expiry <= mono for expiry in s.claims.values())
            and not any(r.get("status") in _UNFINISHED for r in s.history.values())
        ]
        forgotten = 0
        for name in gone:
            forgotten += len(self._jobs.pop(name).history)
        return forgotten

    async def history(self, job: str, limit: int) -> list[dict[str, Any]]:
        records = sorted(self._job(job).history.values(), key=lambda r: r.get("fire_ms", 0))
        return [dict(r) for r in reversed(records)][:limit]

    async def record(self, job: str, fire_id: str) -> dict[str, Any] | None:
        rec = self._job(job).history.get(fire_id)
        return None if rec is None else dict(rec)

    async def set_paused(self, job: str, paused: bool) -> None:
        self._job(job).paused = paused
        self._wake.set()

    async def push_trigger(self, entry: dict[str, Any]) -> None:
        self._triggers.append(entry)
        self._wake.set()

    async def due_triggers(self, limit: int) -> list[dict[str, Any]]:
        return [json.loads(json.dumps(e)) for e in self._triggers[:limit]]

    async def drop_trigger(self, entry: dict[str, Any]) -> None:
        fire_id = entry.get("fire_id")
        self._triggers = [e for e in self._triggers if e.get("fire_id") != fire_id]

    async def add_once(self, entry: dict[str, Any], at_ms: int) -> None:
        self._once.append((at_ms, json.dumps(entry, sort_keys=True)))
        self._once.sort()
        self._wake.set()

    async def due_once(self, now_ms: int, limit: int) -> list[dict[str, Any]]:
        return [json.loads(e) for at, e in self._once if at <= now_ms][:limit]

    async def next_once_ms(self) -> int | None:
        return self._once[0][0] if self._once else None

    async def drop_once(self, entry: dict[str, Any]) -> None:
        text = json.dumps(entry, sort_keys=True)
        self._once = [(at, e) for at, e in self._once if e != text]

    async def wake(self) -> None:
        self._wake.set()

    async def wait_wakeup(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))
        woken = self._wake.is_set()
        self._wake.clear()
        return woken
