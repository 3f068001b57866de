"""Fires that run away from the leader: ``run_on="any"`` and ``broadcast=True``.

The leader claims the fire as usual (once per fire), then hands it over:

* ``run_on="any"``: one entry on a Redis Stream read by the consumer group of
  every node, so whichever node is free takes it (load spreads).  A delivery is
  at-least-once, a start at most once: the receiving node first moves the fire's
  history record from ``claimed``/``dispatched`` to ``running`` with a Lua
  compare-and-set (``transition.lua``), and only the node whose CAS succeeded
  calls the job; the entry is acknowledged after the CAS either way.  An entry
  left pending longer than ``redeliver_after`` (its node died or froze before the
  CAS) is claimed by the leader (XAUTOCLAIM) and put back on the stream for
  another node, up to ``max_deliveries`` times, then recorded ``abandoned``.  A
  running fire renews its run lease; if its node dies, the leader records it as
  ``lost`` once the lease expires (``reap.lua``), and it is never started again.
* ``broadcast=True``: one entry on a broadcast stream naming the live members
  (from a heartbeat set kept with server time, XXL-JOB's sharding broadcast);
  each member runs its shard with ``ctx.shard_index`` / ``ctx.shard_total``,
  after a compare-and-set that records the shard ``running`` (``start_shard.lua``).
  A shard whose member's heartbeat lapses before it reports is recorded ``lost``
  by the leader (``reap.lua``), one its live member never started ``abandoned``,
  so every broadcast fire reaches a final status; each shard's outcome is
  recorded once.

Both loops exist only on nodes that registered such jobs, and they block on the
server (XREADGROUP/XREAD BLOCK) rather than poll; redelivery and reaping run on
the leader alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as redis_errors

from asgi_dist.backends import RedisBackend
from asgi_dist.backends.redis import LONGEST_BLOCK, block_ms
from asgi_dist.errors import ConfigError
from asgi_dist.scheduling.jobs import validate_job_name
from asgi_dist.scheduling.store_redis import RedisStore

__all__ = ["Dispatcher"]

log = logging.getLogger("asgi_dist.scheduling")

_GROUP = "nodes"
# The longest block there is, which the socket timeout of our clients outlasts by
# connect_timeout (backends.redis.read_timeout).
_BLOCK_MS = block_ms(LONGEST_BLOCK)
_MAXLEN = 10_000
_PAGES = 10  # XAUTOCLAIM pages of 100 per redelivery pass (bounds one pass)

Handler = Callable[[dict[str, Any]], Awaitable[None]]
AnyHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Dispatcher:
    def __init__(self, backend: RedisBackend, store: RedisStore, node_id: str, ttl: float) -> None:
        self.backend = backend
        self.store = store
        self.client = backend.client
        self.node_id = node_id
        self.ttl_ms = round(ttl * 1000)
        self.any_stream = backend.key("schedctl", "cluster", "any")
        self.broadcast_stream = backend.key("schedctl", "cluster", "broadcast")
        self.members_key = backend.key("schedctl", "cluster", "members")
        self._heartbeat = backend.script("asgi_dist.scheduling", "heartbeat")
        self._transition = backend.script("asgi_dist.scheduling", "transition")
        self._prune = backend.script("asgi_dist.scheduling", "prune_consumers")
        self._start_shard = backend.script("asgi_dist.scheduling", "start_shard")
        self._broadcast_from: str | None = None

    # leader side -------------------------------------------------------------------

    async def members(self) -> list[str]:
        raw = await self._heartbeat(self.client, [self.members_key], ["", self.ttl_ms, "0"])
        return sorted(_text(m) for m in raw)

    async def send_any(self, entry: dict[str, Any]) -> None:
        await self.client.xadd(
            self.any_stream, {"entry": json.dumps(entry)}, maxlen=_MAXLEN, approximate=True
        )

    async def mark_dispatched(self, job: str, fire_id: str) -> None:
        """Say in history that the fire is on the stream, unless a node already started it."""
        await self._move(job, fire_id, "claimed", "dispatched")

    async def redeliver(self, min_idle_ms: int, max_deliveries: int) -> int:
        """Put back on the stream every fire whose entry has waited unacknowledged in a
        node's pending list for ``min_idle_ms`` (the node died or froze before its
        compare-and-set); returns how many were put back."""
        cursor: Any = "0-0"
        sent = 0
        for _ in range(_PAGES):
            reply: Any = await self.client.xautoclaim(
                self.any_stream, _GROUP, self.node_id, min_idle_ms, cursor, count=100
            )
            cursor, messages = reply[0], reply[1]
            for message_id, fields in messages:
                sent += await self._redeliver_one(message_id, fields, max_deliveries)
            if _text(cursor) == "0-0":
                break
        return sent

    async def _redeliver_one(self, message_id: Any, fields: Any, max_deliveries: int) -> int:
        try:
            entry = _entry(fields)
            job, fire_id = entry["job"], entry["fire_id"]
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            log.error("dropping malformed dispatch entry %s: %s", _text(message_id), exc)
            await self.ack(message_id)
            return 0
        delivery = entry["delivery"]
        record = await self.store.record(job, fire_id)
        status = None if record is None else record.get("status")
        sent = 0
        if status in ("claimed", "dispatched"):
            if delivery >= max_deliveries:
                error = f"no node started it after {delivery} deliveries"
                await self._move(job, fire_id, "claimed,dispatched", "abandoned", error=error)
                log.error("scheduler: fire %s abandoned: %s", fire_id, error)
            else:
                # A new entry for any free node; the stuck node, should it wake up,
                # loses the compare-and-set to whoever starts the fire first.
                await self.send_any({**entry, "delivery": delivery + 1})
                sent = 1
        # Started (or finished, or trimmed from history): nothing to hand out again.
        await self.ack(message_id)
        return sent

    async def prune_consumers(self, min_idle_ms: int) -> int:
        """Forget consumer names of nodes gone for ``min_idle_ms`` with nothing pending."""
        deleted = await self._prune(
            self.client, [self.any_stream], [_GROUP, min_idle_ms, self.node_id]
        )
        return int(deleted)

    async def send_broadcast(self, entry: dict[str, Any]) -> None:
        await self.client.xadd(
            self.broadcast_stream, {"entry": json.dumps(entry)}, maxlen=_MAXLEN, approximate=True
        )

    # every node ----------------------------------------------------------------------

    async def join(self, *, member: bool) -> None:
        """Join the run_on="any" consumer group, and (``member``: this node has broadcast
        jobs) the membership that shards broadcasts."""
        if member:
            # Read broadcasts from the stream's end as it was before the first beat:
            # every entry naming this node (sharded after the beat) comes after it.
            newest = await self.client.xrevrange(self.broadcast_stream, count=1)
            self._broadcast_from = _text(newest[0][0]) if newest else "0-0"
            await self.beat()
        try:
            # From the start of the stream: entries added before the group existed
            # (a leader's hand-overs right after the server lost its data) are fires
            # to run; any already started is refused by the compare-and-set.
            await self.client.xgroup_create(self.any_stream, _GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _join_quietly(self) -> None:
        try:
            await self.join(member=False)
        except (redis_errors.RedisError, OSError) as exc:
            log.warning("scheduler could not rejoin the dispatch group: %s", exc)

    async def leave(self) -> None:
        await self._heartbeat(self.client, [self.members_key], [self.node_id, self.ttl_ms, "1"])

    async def beat(self) -> None:
        await self._heartbeat(self.client, [self.members_key], [self.node_id, self.ttl_ms, "0"])

    async def heartbeat_forever(self) -> None:
        # Three beats per ttl: a member survives two lost beats before it is dropped.
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                await self.beat()
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("scheduler heartbeat failed: %s", exc)

    async def consume_any_forever(self, handle: AnyHandler) -> None:
        """Hand each entry to ``handle(message_id, entry)``, which starts it (or not) and
        acknowledges it; an entry it leaves unacknowledged is redelivered by the leader."""
        while True:
            try:
                reply: Any = await self.client.xreadgroup(
                    _GROUP, self.node_id, {self.any_stream: ">"}, count=10, block=_BLOCK_MS
                )
            except redis_errors.TimeoutError as exc:
                # No answer within the socket timeout, which outlasts the block: Redis
                # stopped answering.  redis-py dropped the connection (no reply of it can
                # be mistaken for a later one's), the next read takes a new one; no
                # pause, the timeout was one.
                log.warning("scheduler dispatch read got no answer: %s", exc)
                continue
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("scheduler dispatch read failed: %s", exc)
                await asyncio.sleep(1.0)
                if "NOGROUP" in str(exc):
                    # The stream went away with the server's data (restart, flush).
                    await self._join_quietly()
                continue
            for _stream, messages in reply or []:
                for message_id, fields in messages:
                    try:
                        entry = _entry(fields)
                    except (KeyError, TypeError, ValueError, ConfigError) as exc:
                        log.error("dropping malformed dispatch entry %s: %s", message_id, exc)
                        await self.ack(message_id)
                        continue
                    try:
                        await handle(_text(message_id), entry)
                    except (redis_errors.RedisError, OSError) as exc:
                        # Left pending: the leader hands it out again later.
                        log.warning("could not start dispatched fire %s: %s", entry, exc)
                    except Exception:
                        # One bad entry must not end this node's consumption.
                        log.exception("dispatched fire %s failed to start", entry)

    async def start_fire(self, job: str, fire_id: str, lease_ms: int, delivery: int) -> str:
        """The compare-and-set before a start: ``"running"`` if this node must run the fire,
        else the status that stopped it (already started elsewhere, finished, ...)."""
        moved, before = await self._move(
            job,
            fire_id,
            "claimed,dispatched",
            "running",
            node=self.node_id,
            lease_ms=lease_ms,
            delivery=delivery,
        )
        return "running" if moved else before

    async def ack(self, message_id: Any) -> None:
        await self.client.xack(self.any_stream, _GROUP, message_id)

    async def _move(
        self,
        job: str,
        fire_id: str,
        expected: str,
        new: str,
        *,
        node: str = "",
        lease_ms: int | None = None,
        error: str = "",
        delivery: int | None = None,
    ) -> tuple[bool, str]:
        keys = [self.store.job_key(job, "hist"), self.store.job_key(job, "active")]
        args = [
            fire_id,
            expected,
            new,
            node,
            "" if lease_ms is None else lease_ms,
            error,
            "" if delivery is None else delivery,
        ]
        moved, before = await self._transition(self.client, keys, args)
        return _text(moved) == "1", _text(before)

    async def start_shard(self, job: str, fire_id: str, index: int) -> str:
        """The compare-and-set before a shard starts: ``"running"`` if this member must run
        it, else what stopped it (recorded lost or abandoned by the leader meanwhile)."""
        keys = [self.store.job_key(job, "hist")]
        return _text(await self._start_shard(self.client, keys, [fire_id, index, self.node_id]))

    async def consume_broadcast_forever(self, handle: Handler) -> None:
        # From the stream's end when this node joined, then follow ids: no gap.
        last = self._broadcast_from
        if last is None:
            newest = await self.client.xrevrange(self.broadcast_stream, count=1)
            last = _text(newest[0][0]) if newest else "0-0"
        while True:
            try:
                reply: Any = await self.client.xread(
                    {self.broadcast_stream: last}, count=10, block=_BLOCK_MS
                )
            except redis_errors.TimeoutError as exc:
                log.warning("scheduler broadcast read got no answer: %s", exc)  # as above
                continue
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("scheduler broadcast read failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for _stream, messages in reply or []:
                for message_id, fields in messages:
                    last = _text(message_id)
                    try:
                        await handle(json.loads(_text(fields[b"entry"])))
                    except Exception:
                        log.exception("broadcast entry %s could not start", last)


def _entry(fields: Any) -> dict[str, Any]:
    """A dispatch entry, its job name validated: it is about to name Redis keys."""
    entry = json.loads(_text(fields[b"entry"]))
    if not isinstance(entry, dict):
        raise ValueError(f"entry {entry!r} is not an object")
    entry["job"] = validate_job_name(entry["job"])
    entry["fire_id"] = str(entry["fire_id"])
    entry["fire_ms"], entry["fence"] = int(entry["fire_ms"]), int(entry["fence"])
    entry["delivery"] = int(entry.get("delivery", 1))
    return entry
