"""The Redis store: one hash tag per job, the claim in one Lua script (``claim.lua``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Sequence
from typing import Any

from asgi_dist.backends import RedisBackend
from asgi_dist.backends.pubsub import PubSubHub, Subscription
from asgi_dist.scheduling.store import Claim, ClaimResult, JobState

__all__ = ["RedisStore"]

_PACKAGE = "asgi_dist.scheduling"
MAX_ENTRY_BYTES = 64 * 1024


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    if value is None:
        return None
    text = _decode(value)
    return None if text in ("", "none") else int(text)


class RedisStore:
    def __init__(self, backend: RedisBackend, hub: PubSubHub, *, history_cap: int) -> None:
        self.backend = backend
        self.hub = hub
        self.client = backend.client
        self.history_cap = history_cap
        self._claim = backend.script(_PACKAGE, "claim")
        self._finish = backend.script(_PACKAGE, "finish")
        self._renew = backend.script(_PACKAGE, "renew")
        self._init = backend.script(_PACKAGE, "init")
        self._alive = backend.script(_PACKAGE, "alive")
        self._reap = backend.script(_PACKAGE, "reap")
        self._triggers = backend.key("schedctl", "cluster", "triggers")
        self._once = backend.key("schedctl", "cluster", "once")
        self._one_offs = backend.key("schedctl", "cluster", "oneoffs")
        self._untrack = backend.script(_PACKAGE, "untrack")
        self._channel = backend.key("schedctl", "cluster", "wake")
        self._subscription: Subscription | None = None
        self._woken = asyncio.Event()

    def job_key(self, job: str, suffix: str) -> str:
        """``{ns:sched:<job>}:<suffix>``: one slot per job, so its scripts run on Cluster."""
        return self.backend.key("sched", job, suffix)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    async def now_ms(self) -> int:
        seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def init_job(self, job: str, signature: str, first_next: int | None) -> JobState:
        raw = await self._init(
            self.client,
            [self.job_key(job, "state")],
            [signature, "none" if first_next is None else str(first_next)],
        )
        return self._state(raw)

    async def state(self, job: str) -> JobState:
        raw = await self.client.hmget(self.job_key(job, "state"), ["next", "paused", "fence"])
        return self._state(raw)

    @staticmethod
    def _state(raw: list[Any]) -> JobState:
        nxt, paused, fence = raw
        return JobState(
            next_ms=_int(nxt),
            paused=paused is not None and _decode(paused) == "1",
            fence=_int(fence) or 0,
        )

    async def claim(self, claim: Claim) -> ClaimResult:
        if claim.advance:
            new_next = "none" if claim.new_next is None else str(claim.new_next)
        else:
            new_next = ""
        keys = [
            self.job_key(claim.job, "state"),
            self.job_key(claim.job, f"fire:{claim.fire_id}"),
            self.job_key(claim.job, "running"),
            self.job_key(claim.job, "hist"),
            self.job_key(claim.job, "hidx"),
            self.job_key(claim.job, "active"),
        ]
        args = [
            str(claim.fire_ms),
            claim.fire_id,
            "" if claim.expected_next is None else str(claim.expected_next),
            new_next,
            str(claim.fence),
            claim.intent,
            json.dumps(claim.record),
            claim.overlap,
            str(claim.lease_ms),
            str(claim.claim_ttl_ms),
            str(self.history_cap),
            claim.signature,
            str(claim.retain_ms),
        ]
        status, detail = await self._claim(self.client, keys, args)
        status, detail = _decode(status), _decode(detail)
        server_ms = int(detail) if status not in ("early", "moved", "stale", "duplicate") else 0
        return ClaimResult(status, detail, server_ms)  # type: ignore[arg-type]

    async def finish(
        self,
        job: str,
        fire_id: str,
        patch: dict[str, Any],
        *,
        release: bool,
        shard: tuple[int, int] | None = None,
    ) -> bool:
        shard_args: list[Any] = ["", ""] if shard is None else list(shard)
        written = await self._finish(
            self.client,
            [self.job_key(job, "hist"), self.job_key(job, "running")],
            [fire_id, json.dumps(patch), "1" if release else "0", *shard_args],
        )
        return bool(written)

    async def renew(self, job: str, fire_id: str, lease_ms: int) -> bool:
        ok = await self._renew(self.client, [self.job_key(job, "running")], [fire_id, lease_ms])
        return bool(ok)

    async def keep_running(
        self, job: str, fire_id: str, lease_ms: int, *, attempt: int | None = None, node: str = ""
    ) -> bool:
        """Renew the run lease of a fire this node is running (see ``alive.lua``)."""
        keys = [
            self.job_key(job, "hist"),
            self.job_key(job, "active"),
            self.job_key(job, "state"),
            self.job_key(job, "hidx"),
        ]
        args = [fire_id, lease_ms, "" if attempt is None else attempt, node]
        return bool(await self._alive(self.client, keys, args))

    async def reap_lost(
        self, job: str, limit: int = 1000, members: Sequence[str] | None = None
    ) -> list[str]:
        """Record as lost the fires of ``job`` whose node stopped renewing the run lease,
        and the broadcast shards whose member is not among ``members`` (see reap.lua)."""
        keys = [self.job_key(job, "hist"), self.job_key(job, "active")]
        live = "" if members is None else json.dumps(list(members))
        lost = await self._reap(self.client, keys, [limit, live])
        return [_decode(f) for f in lost]

    async def has_runs(self, job: str) -> bool:
        return bool(await self.client.zcard(self.job_key(job, "active")))

    async def track_one_off(self, job: str) -> None:
        await self.client.zadd(self._one_offs, {job: secrets.randbits(40)})

    async def one_off_names(self) -> dict[str, float]:
        raw: Any = await self.client.zrange(self._one_offs, 0, -1, withscores=True)
        return {_decode(name): float(score) for name, score in raw}

    async def untrack_one_off(self, job: str, token: float) -> None:
        await self._untrack(self.client, [self._one_offs], [job, repr(token)])

    async def forget_retired(self) -> int:
        return 0  # a retired one-off name's keys expire by themselves (claim.lua)

    async def history(self, job: str, limit: int) -> list[dict[str, Any]]:
        ids = await self.client.zrevrange(self.job_key(job, "hidx"), 0, limit - 1)
        if not ids:
            return []
        raw = await self.client.hmget(self.job_key(job, "hist"), [_decode(i) for i in ids])
        return [json.loads(r) for r in raw if r is not None]

    async def record(self, job: str, fire_id: str) -> dict[str, Any] | None:
        raw = await self.client.hget(self.job_key(job, "hist"), fire_id)
        return None if raw is None else dict(json.loads(raw))

    async def set_paused(self, job: str, paused: bool) -> None:
        await self.client.hset(self.job_key(job, "state"), "paused", "1" if paused else "0")
        await self.wake()

    async def push_trigger(self, entry: dict[str, Any]) -> None:
        await self.client.rpush(self._triggers, _bounded(entry))
        await self.wake()

    async def due_triggers(self, limit: int) -> list[dict[str, Any]]:
        raw: Any = await self.client.lrange(self._triggers, 0, limit - 1)
        return [json.loads(r) for r in raw]

    async def drop_trigger(self, entry: dict[str, Any]) -> None:
        await self.client.lrem(self._triggers, 1, _bounded(entry))

    async def add_once(self, entry: dict[str, Any], at_ms: int) -> None:
        await self.client.zadd(self._once, {_bounded(entry): at_ms})
        await self.wake()

    async def due_once(self, now_ms: int, limit: int) -> list[dict[str, Any]]:
        raw: Any = await self.client.zrangebyscore(self._once, "-inf", now_ms, start=0, num=limit)
        return [json.loads(r) for r in raw]

    async def next_once_ms(self) -> int | None:
        first = await self.client.zrange(self._once, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def drop_once(self, entry: dict[str, Any]) -> None:
        await self.client.zrem(self._once, _bounded(entry))

    async def wake(self) -> None:
        await self.client.publish(self._channel, "1")

    async def wait_wakeup(self, seconds: float) -> bool:
        if self._subscription is None:
            # The process's shared pub/sub connection (one per Dist, also on
            # Cluster); subscribe returns once Redis acknowledged it.
            self._subscription = await self.hub.subscribe(self._channel, self._on_wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), max(0.0, seconds))
        woken = self._woken.is_set()
        self._woken.clear()
        return woken

    def _on_wake(self, payload: bytes | None) -> None:
        # None means "reconnected, messages may be lost": waking is the safe answer.
        self._woken.set()


def _bounded(entry: dict[str, Any]) -> str:
    # sort_keys: the same entry always encodes alike, so ZREM finds it.
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_ENTRY_BYTES:
        raise ValueError(f"scheduler entry of {len(text)} bytes exceeds {MAX_ENTRY_BYTES}")
    return text
