"""Fires that run away from the leader: ``run_on="any"`` and ``broadcast=True``.

The leader claims the fire as usual (once per fire), then hands it over:

* ``run_on="any"``: one entry on a Redis Stream read by the consumer group of
  every node, so whichever node is free takes it (load spreads).  The entry is
  acknowledged before the run starts, which keeps "at most one start per fire";
  a node that dies between reading and acknowledging leaves the fire recorded as
  ``dispatched``, visible in history.
* ``broadcast=True``: one entry on a broadcast stream naming the live members
  (from a heartbeat set kept with server time, XXL-JOB's sharding broadcast);
  each member runs its shard with ``ctx.shard_index`` / ``ctx.shard_total``.

Both loops exist only on nodes that registered such jobs, and they block on the
server (XREADGROUP/XREAD BLOCK) rather than poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from redis import exceptions as redis_errors

from asgi_dist.backends import RedisBackend

__all__ = ["Dispatcher"]

log = logging.getLogger("asgi_dist.scheduling")

_GROUP = "nodes"
_BLOCK_MS = 5000
_MAXLEN = 10_000

Handler = Callable[[dict[str, Any]], None]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Dispatcher:
    def __init__(self, backend: RedisBackend, node_id: str, ttl: float) -> None:
        self.backend = backend
        self.client = backend.client
        self.node_id = node_id
        self.ttl_ms = round(ttl * 1000)
        self.any_stream = backend.key("schedctl", "cluster", "any")
        self.broadcast_stream = backend.key("schedctl", "cluster", "broadcast")
        self.members_key = backend.key("schedctl", "cluster", "members")
        self._heartbeat = backend.script("asgi_dist.scheduling", "heartbeat")

    # leader side -------------------------------------------------------------------

    async def members(self) -> list[str]:
        raw = await self._heartbeat(self.client, [self.members_key], ["", self.ttl_ms, "0"])
        return sorted(_text(m) for m in raw)

    async def send_any(self, entry: dict[str, Any]) -> None:
        await self.client.xadd(
            self.any_stream, {"entry": json.dumps(entry)}, maxlen=_MAXLEN, approximate=True
        )

    async def send_broadcast(self, entry: dict[str, Any]) -> None:
        await self.client.xadd(
            self.broadcast_stream, {"entry": json.dumps(entry)}, maxlen=_MAXLEN, approximate=True
        )

    # every node ----------------------------------------------------------------------

    async def join(self) -> None:
        await self._heartbeat(self.client, [self.members_key], [self.node_id, self.ttl_ms, "0"])
        try:
            await self.client.xgroup_create(self.any_stream, _GROUP, id="$", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def leave(self) -> None:
        await self._heartbeat(self.client, [self.members_key], [self.node_id, self.ttl_ms, "1"])

    async def heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                await self._heartbeat(
                    self.client, [self.members_key], [self.node_id, self.ttl_ms, "0"]
                )
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("scheduler heartbeat failed: %s", exc)

    async def consume_any_forever(self, handle: Handler) -> None:
        while True:
            try:
                reply: Any = await self.client.xreadgroup(
                    _GROUP, self.node_id, {self.any_stream: ">"}, count=10, block=_BLOCK_MS
                )
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("scheduler dispatch read failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for _stream, messages in reply or []:
                for message_id, fields in messages:
                    # Acknowledge first: a start must never repeat (at most once).
                    await self.client.xack(self.any_stream, _GROUP, message_id)
                    handle(json.loads(_text(fields[b"entry"])))

    async def consume_broadcast_forever(self, handle: Handler) -> None:
        # Start after the newest entry, then follow ids: no gap between reads.
        newest = await self.client.xrevrange(self.broadcast_stream, count=1)
        last = _text(newest[0][0]) if newest else "0-0"
        while True:
            try:
                reply: Any = await self.client.xread(
                    {self.broadcast_stream: last}, count=10, block=_BLOCK_MS
                )
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("scheduler broadcast read failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for _stream, messages in reply or []:
                for message_id, fields in messages:
                    last = _text(message_id)
                    handle(json.loads(_text(fields[b"entry"])))
