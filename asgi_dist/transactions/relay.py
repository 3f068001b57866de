"""The outbox relay: committed outbox rows become entries of their topic's Redis stream.

It runs in every process.  Rows are spread over :data:`PARTITIONS` partitions by
key; a relay claims partitions with ``FOR UPDATE SKIP LOCKED`` and holds each
under a lease with a fence (a counter bumped by every claim).  Marking rows
published checks the fence under a row lock, so a relay that was paused past
its lease cannot mark rows another relay now owns.  One owner per partition and
``ORDER BY seq`` keep the rows of one key in order.  Delivery is at least once
(a relay that dies between ``XADD`` and marking re-publishes); consumers dedupe
by message id in their inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Any

import asyncpg

from asgi_dist.backends import PostgresBackend, RedisBackend, as_backend_unavailable
from asgi_dist.transactions.config import TransactionConfig

__all__ = ["Refused", "Relay", "purge_loop", "purge_once"]

log = logging.getLogger("asgi_dist.transactions")

# A relay claims at most this many partitions at a time, so that several relays share.
_CLAIM = 4


def stream_key(redis: RedisBackend, topic: str) -> str:
    return redis.key("topic", topic, "stream")


async def wait_event(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds``.

    ``asyncio.timeout``, not ``wait_for``: on Python 3.11 ``wait_for`` can turn a
    cancellation that races its timeout into a TimeoutError, and a worker loop
    that suppresses the timeout would then never stop.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


class Backoff:
    """Exponential delay after an outage, reset by success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.current = first, cap, 0.0

    def reset(self) -> None:
        self.current = 0.0

    async def sleep(self) -> None:
        self.current = min(self.cap, self.current * 2 or self.first)
        await asyncio.sleep(self.current * random.uniform(0.5, 1.0))


class Refused(Exception):
    """Redis refused the XADD of some rows (a key of another type, an entry over its
    size limit) and took the others, whose entry ids are in ``stream_ids`` ("" where
    refused)."""

    def __init__(self, stream_ids: list[str], topic: str, error: Exception) -> None:
        refused = sum(1 for sid in stream_ids if not sid)
        super().__init__(
            f"Redis refused {refused} of {len(stream_ids)} outbox entries, e.g. on topic "
            f"{topic!r}: {type(error).__name__}: {error}; they stay in the outbox and are "
            "retried: fix the cause (the key of that topic's stream, Redis' limits)"
        )
        self.stream_ids = stream_ids


@dataclass(frozen=True)
class Claim:
    """Leased partitions and the fence of each lease."""

    partitions: list[int]
    fences: list[int]


class Relay:
    """One process's relay loop: wake on NOTIFY or poll, claim, XADD, mark, repeat."""

    def __init__(
        self,
        postgres: PostgresBackend,
        redis: RedisBackend,
        config: TransactionConfig,
        node_id: str,
        stopping: asyncio.Event,
    ) -> None:
        self.postgres = postgres
        self.stopping = stopping  # checked by the loops as well as cancellation
        self.redis = redis
        self.config = config
        self.node_id = node_id
        self.wakeup = asyncio.Event()
        self.relayed = 0  # rows this process marked published (for tests and stats)
        outbox, lease = postgres.table("outbox"), postgres.table("outbox_lease")
        self.channel = f"{postgres.namespace}_outbox"
        # One round trip: lease partitions that have ready rows (one index probe each,
        # not a scan of the backlog), then read the oldest rows of each, in seq order.
        self._claim = f"""
            WITH free AS (
                SELECT l.partition FROM {lease} l
                WHERE (l.lease_until < now() OR l.owner = $1)
                  AND EXISTS (SELECT 1 FROM {outbox} o WHERE o.partition = l.partition
                              AND o.state = 0 AND o.published_at IS NULL)
                ORDER BY random() LIMIT $2
                FOR UPDATE OF l SKIP LOCKED
            )
            , claimed AS (
                UPDATE {lease} l SET owner = $1, fence = l.fence + 1,
                       lease_until = now() + make_interval(secs => $3)
                FROM free WHERE l.partition = free.partition
                RETURNING l.partition, l.fence
            )
            SELECT c.partition, c.fence, o.seq, o.msg_id, o.topic, o.key, o.payload, o.headers
            FROM claimed c LEFT JOIN LATERAL (
                -- The oldest rows that start within the partition's share of the byte
                -- budget: a prefix in seq order, never empty (octet_length reads the
                -- stored length, it does not detoast the payload).
                SELECT * FROM (
                    SELECT seq, msg_id, topic, key, payload, headers,
                           sum(octet_length(payload) + coalesce(octet_length(headers), 0))
                               OVER (ORDER BY seq) AS upto,
                           octet_length(payload) + coalesce(octet_length(headers), 0) AS size
                    FROM {outbox}
                    WHERE partition = c.partition AND state = 0 AND published_at IS NULL
                    ORDER BY seq LIMIT $4
                ) w WHERE w.upto - w.size < $5
            ) o ON true
            ORDER BY o.seq"""
        # The lease rows are locked first and re-checked (owner, fence, expiry), so a
        # claim by another relay either happened before (we mark nothing) or waits.
        self._mark = f"""
            WITH owned AS (
                SELECT l.partition FROM {lease} l
                JOIN unnest($2::int[], $3::bigint[]) AS c(partition, fence)
                  ON l.partition = c.partition AND l.fence = c.fence
                WHERE l.owner = $1 AND l.lease_until > now()
                FOR UPDATE OF l
            ), marked AS (
                UPDATE {outbox} o SET published_at = now(), stream_id = r.sid
                FROM unnest($4::bigint[], $5::text[]) AS r(seq, sid), owned
                WHERE o.seq = r.seq AND o.partition = owned.partition
                RETURNING 1
            ), released AS (
                UPDATE {lease} l SET lease_until = '-infinity'
                FROM owned WHERE l.partition = owned.partition
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM marked), (SELECT count(*) FROM released)"""
        self._release = f"""
            UPDATE {lease} l SET lease_until = '-infinity'
            FROM unnest($2::int[], $3::bigint[]) AS c(partition, fence)
            WHERE l.partition = c.partition AND l.fence = c.fence AND l.owner = $1"""

    async def run(self) -> None:
        """Relay until cancelled; outages are retried with backoff, nothing is lost."""
        listener = asyncio.create_task(self._listen(), name="asgi_dist:outbox-listen")
        backoff = Backoff(cap=self.config.relay_poll_interval * 5)
        try:
            while not self.stopping.is_set():
                try:
                    while await self.relay_once():
                        pass
                    backoff.reset()
                except Exception as exc:
                    if isinstance(exc, Refused):
                        log.error("outbox relay: %s", exc)
                    elif as_backend_unavailable(exc) is None:
                        log.exception("outbox relay failed; retrying")
                    else:
                        log.warning("outbox relay: %s; retrying", exc)
                    await backoff.sleep()
                    continue
                await wait_event(self.wakeup, self.config.relay_poll_interval)
                self.wakeup.clear()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener

    async def relay_once(self) -> int:
        """Claim some partitions, relay one batch of them; returns the rows marked."""
        claimed = await self.claim()
        if claimed is None:
            return 0
        claim, rows = claimed
        try:
            stream_ids = await self.xadd(rows) if rows else []
        except Refused as refused:
            # Redis took the other entries: mark those, or every retry would publish
            # them again while the refused rows wait (in the outbox) for a fix.
            taken = [(r, sid) for r, sid in zip(rows, refused.stream_ids, strict=True) if sid]
            await self.mark(claim, [r for r, _ in taken], [sid for _, sid in taken])
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                await self.postgres.pool.execute(
                    self._release, self.node_id, claim.partitions, claim.fences
                )
            raise
        return await self.mark(claim, rows, stream_ids)

    async def claim(self) -> tuple[Claim, list[asyncpg.Record]] | None:
        """Lease up to a few partitions with ready rows (``SKIP LOCKED``) and read their
        oldest rows, in publish order; ``None`` when there is nothing to relay."""
        per_partition = -(-self.config.relay_batch // _CLAIM)
        bytes_per_partition = -(-self.config.relay_batch_bytes // _CLAIM)
        found = await self.postgres.pool.fetch(
            self._claim,
            self.node_id,
            _CLAIM,
            self.config.relay_lease,
            per_partition,
            bytes_per_partition,
        )
        if not found:
            return None
        fences = {r["partition"]: r["fence"] for r in found}
        claim = Claim(list(fences), list(fences.values()))
        return claim, [r for r in found if r["seq"] is not None]

    async def mark(self, claim: Claim, rows: list[asyncpg.Record], stream_ids: list[str]) -> int:
        """Mark ``rows`` published and release the lease, if the lease is still ours."""
        marked, _ = await self.postgres.pool.fetchrow(
            self._mark,
            self.node_id,
            claim.partitions,
            claim.fences,
            [r["seq"] for r in rows],
            stream_ids,
        )
        if marked < len(rows):
            log.warning(
                "outbox relay lost the lease of partitions %s before marking %d rows: their new "
                "owner publishes them again (consumers drop the duplicates)",
                claim.partitions,
                len(rows) - marked,
            )
        self.relayed += marked
        return int(marked)

    async def xadd(self, rows: list[asyncpg.Record]) -> list[str]:
        """One pipelined XADD per row to its topic's stream; returns the entry ids.

        Raises :class:`Refused` if Redis refused some of them and took the rest.
        """
        maxlen = self.config.stream_maxlen
        pipe = self.redis.client.pipeline(transaction=False)
        for row in rows:
            fields: dict[Any, Any] = {
                "id": str(row["msg_id"]),
                "payload": row["payload"],
                "seq": row["seq"],
            }
            if row["key"] is not None:
                fields["key"] = row["key"]
            if row["headers"] is not None:
                fields["headers"] = row["headers"]
            pipe.xadd(
                stream_key(self.redis, row["topic"]),
                fields,
                maxlen=maxlen,
                approximate=True,
            )
        results = await pipe.execute(raise_on_error=False)
        stream_ids = [
            "" if isinstance(r, Exception) else r.decode() if isinstance(r, bytes) else str(r)
            for r in results
        ]
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, Exception):
                raise Refused(stream_ids, row["topic"], result)
        return stream_ids

    async def _listen(self) -> None:
        """Hold one connection in LISTEN; reconnect after outages."""
        backoff = Backoff(cap=self.config.relay_poll_interval * 5)

        def notified(*_: Any) -> None:
            self.wakeup.set()

        while not self.stopping.is_set():
            try:
                async with self.postgres.pool.acquire() as conn:
                    await conn.add_listener(self.channel, notified)
                    backoff.reset()
                    try:
                        # Wake once in case rows were committed while we were not listening.
                        self.wakeup.set()
                        await _closed(conn)
                    finally:
                        with contextlib.suppress(Exception):
                            await conn.remove_listener(self.channel, notified)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("outbox LISTEN connection lost: %s", exc)
            await backoff.sleep()


async def _closed(conn: asyncpg.Connection) -> None:
    closed = asyncio.Event()
    conn.add_termination_listener(lambda _: closed.set())
    await closed.wait()


async def purge_once(postgres: PostgresBackend, config: TransactionConfig) -> int:
    """Delete published outbox rows and inbox rows past their retention; returns how many.

    Batches are bounded and chosen with ``SKIP LOCKED``, so purges that overlap
    (the per-process fallback, or a fire running late) neither block nor repeat
    each other; rows left over wait for the next purge.
    """
    outbox, inbox = postgres.table("outbox"), postgres.table("inbox")
    statements = [
        (
            f"DELETE FROM {outbox} WHERE seq IN (SELECT seq FROM {outbox} WHERE published_at"
            " < now() - make_interval(secs => $1) LIMIT 5000 FOR UPDATE SKIP LOCKED)",
            config.retention,
        ),
        (
            f"DELETE FROM {inbox} WHERE (grp, msg_id) IN (SELECT grp, msg_id FROM {inbox} WHERE"
            " processed_at < now() - make_interval(secs => $1) LIMIT 5000"
            " FOR UPDATE SKIP LOCKED)",
            config.inbox_retention,
        ),
    ]
    purged = 0
    for sql, retention in statements:
        for _ in range(100):  # bounded: the next purge continues
            status = await postgres.pool.execute(sql, retention)
            deleted = int(status.split()[-1])
            purged += deleted
            if deleted < 5000:
                break
    return purged


async def purge_loop(
    postgres: PostgresBackend, config: TransactionConfig, stopping: asyncio.Event
) -> None:
    """:func:`purge_once` every ``purge_interval`` in this process.

    The fallback for a process whose scheduler is off; otherwise the purge is the
    scheduler job ``asgi_dist.outbox.purge``, run by one node per fire.
    """
    while not stopping.is_set():
        await wait_event(stopping, config.purge_interval * random.uniform(0.5, 1.0))
        if stopping.is_set():
            return
        try:
            await purge_once(postgres, config)
        except Exception as exc:
            log.warning("outbox/inbox purge failed: %s; retrying next round", exc)
