"""The PostgreSQL store: the claim is one transaction holding the job row lock,
with the fire's primary key as the unique constraint that refuses a second claim."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg

from asgi_dist.backends import PostgresBackend
from asgi_dist.scheduling.store import Claim, ClaimResult, ClaimStatus, JobState, settle_shard

__all__ = ["MIGRATIONS", "PostgresStore"]

log = logging.getLogger("asgi_dist.scheduling")

MIGRATIONS = [
    """
    CREATE TABLE {ns}_sched_jobs (
        job text PRIMARY KEY,
        sig text NOT NULL DEFAULT '',
        next_ms bigint,
        paused boolean NOT NULL DEFAULT false,
        fence bigint NOT NULL DEFAULT 0,
        running_fire text,
        running_until timestamptz
    );
    -- One row per fire: its primary key is the claim, its record the history.
    CREATE TABLE {ns}_sched_fires (
        job text NOT NULL,
        fire_id text NOT NULL,
        fire_ms bigint NOT NULL,
        claim_until timestamptz NOT NULL,
        record jsonb NOT NULL,
        PRIMARY KEY (job, fire_id)
    );
    CREATE INDEX {ns}_sched_fires_recent ON {ns}_sched_fires (job, fire_ms DESC);
    CREATE TABLE {ns}_sched_queue (
        id bigserial PRIMARY KEY,
        kind text NOT NULL,
        due_ms bigint NOT NULL,
        entry jsonb NOT NULL
    );
    CREATE INDEX {ns}_sched_queue_due ON {ns}_sched_queue (kind, due_ms);
    """,
    # v2: the run lease of an unfinished fire; when it lapses, the fire is lost.
    """
    ALTER TABLE {ns}_sched_fires ADD COLUMN run_until timestamptz;
    CREATE INDEX {ns}_sched_fires_run ON {ns}_sched_fires (job, run_until)
        WHERE run_until IS NOT NULL;
    """,
    # v3: a one-off's name no job is registered under is forgotten once its runs ended
    # longer than the retention ago (retain_until - run_until = the retention).
    """
    ALTER TABLE {ns}_sched_fires ADD COLUMN retain_until timestamptz;
    ALTER TABLE {ns}_sched_jobs ADD COLUMN retain_until timestamptz;
    CREATE INDEX {ns}_sched_fires_retain ON {ns}_sched_fires (retain_until)
        WHERE retain_until IS NOT NULL;
    CREATE INDEX {ns}_sched_jobs_retain ON {ns}_sched_jobs (retain_until)
        WHERE retain_until IS NOT NULL;
    """,
]

_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"


def _lost(record: str, before: str) -> str:
    """SQL: ``record`` (a fire that was ``before``, claimed or running) recorded lost."""
    return (
        f"{record} || jsonb_build_object('status', 'lost', 'lost_at', {_NOW_MS}, 'error', 'node '"
        f" || coalesce({record}->>'node', '?') || ' stopped renewing the run lease of this '"
        f" || {before} || ' fire (died or froze); the fire is not started again')"
    )


class PostgresStore:
    def __init__(self, backend: PostgresBackend, *, history_cap: int) -> None:
        self.backend = backend
        self.history_cap = history_cap
        self.jobs = backend.table("sched_jobs")
        self.fires = backend.table("sched_fires")
        self.queue = backend.table("sched_queue")
        self.channel = backend.table("sched_wake")
        self._listener: asyncpg.Connection | None = None
        self._wake = asyncio.Event()

    @property
    def pool(self) -> asyncpg.Pool:
        return self.backend.pool

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        if self._listener is not None:
            conn, self._listener = self._listener, None
            with contextlib.suppress(Exception):
                await conn.remove_listener(self.channel, self._on_notify)
                await self.pool.release(conn)

    async def now_ms(self) -> int:
        return int(await self.pool.fetchval(f"SELECT {_NOW_MS}"))

    async def init_job(self, job: str, signature: str, first_next: int | None) -> JobState:
        await self.pool.execute(
            f"INSERT INTO {self.jobs} (job, sig, next_ms) VALUES ($1, $2, $3)"
            f" ON CONFLICT (job) DO UPDATE SET sig = $2, next_ms = $3"
            f" WHERE {self.jobs}.sig <> $2",
            job,
            signature,
            first_next,
        )
        # A registered job's row is kept for good, even under a name one-offs used before.
        await self.pool.execute(
            f"UPDATE {self.jobs} SET retain_until = NULL"
            f" WHERE job = $1 AND retain_until IS NOT NULL",
            job,
        )
        return await self.state(job)

    async def state(self, job: str) -> JobState:
        row = await self.pool.fetchrow(
            f"SELECT next_ms, paused, fence FROM {self.jobs} WHERE job = $1", job
        )
        if row is None:
            return JobState(None, False, 0)
        return JobState(row["next_ms"], row["paused"], row["fence"])

    async def claim(self, claim: Claim) -> ClaimResult:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {self.jobs} (job) VALUES ($1) ON CONFLICT DO NOTHING", claim.job
            )
            # The row lock serialises claims of one job, like the Lua script does.
            row = await conn.fetchrow(
                f"SELECT *, {_NOW_MS} AS now_ms, running_until > now() AS running"
                f" FROM {self.jobs} WHERE job = $1 FOR UPDATE",
                claim.job,
            )
            now = int(row["now_ms"])
            if claim.fence < row["fence"]:
                return ClaimResult("stale", str(row["fence"]))
            if claim.signature and row["sig"] != claim.signature:
                return ClaimResult("moved", str(row["next_ms"]))
            if claim.fire_ms > now:
                return ClaimResult("early", str(claim.fire_ms - now))
            if claim.expected_next is not None and row["next_ms"] != claim.expected_next:
                return ClaimResult("moved", str(row["next_ms"]))
            status: ClaimStatus = "claimed"
            record = dict(claim.record)
            running_fire = row["running_fire"] if row["running"] else None
            if claim.intent != "run":
                status = claim.intent
            elif row["paused"]:
                status, record["error"] = "paused", "the job is paused"
            elif claim.overlap == "forbid" and running_fire is not None:
                status = "skipped"
                record["error"] = "overlap=forbid: the previous run is still running"
            elif claim.overlap in ("forbid", "replace"):
                running_fire = claim.fire_id
            record["status"], record["claimed_at"] = status, now
            # A claimed fire holds a run lease that its runner renews; if the node
            # dies first, the leader records the fire as lost (see reap_lost).
            run_lease = claim.lease_ms if status == "claimed" else None
            # A one-off's name is kept the retention past the run lease, which
            # keep_running moves on (and the retention with it) while the run lasts.
            retain = claim.lease_ms + claim.retain_ms if claim.retain_ms else None
            inserted = await conn.fetchval(
                f"INSERT INTO {self.fires}"
                f" (job, fire_id, fire_ms, claim_until, record, run_until, retain_until)"
                f" VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond', $5::jsonb,"
                f"  now() + $6::bigint * interval '1 millisecond',"
                f"  now() + $7::bigint * interval '1 millisecond')"
                f" ON CONFLICT DO NOTHING RETURNING 1",
                claim.job,
                claim.fire_id,
                claim.fire_ms,
                claim.claim_ttl_ms,
                json.dumps(record),
                run_lease,
                retain,
            )
            next_ms = claim.new_next if claim.advance else row["next_ms"]
            if inserted is None:
                await conn.execute(
                    f"UPDATE {self.jobs} SET next_ms = $2 WHERE job = $1", claim.job, next_ms
                )
                return ClaimResult("duplicate")
            lease = claim.lease_ms if running_fire == claim.fire_id else None
            await conn.execute(
                f"UPDATE {self.jobs} SET fence = $2, next_ms = $3,"
                f" running_fire = CASE WHEN $4::bigint IS NULL THEN running_fire ELSE $5 END,"
                f" running_until = CASE WHEN $4::bigint IS NULL THEN running_until"
                f"   ELSE now() + $4::bigint * interval '1 millisecond' END,"
                f" retain_until = now() + $6::bigint * interval '1 millisecond'"
                f" WHERE job = $1",
                claim.job,
                claim.fence,
                next_ms,
                lease,
                claim.fire_id,
                retain,
            )
            await conn.execute(
                f"DELETE FROM {self.fires} WHERE job = $1 AND claim_until < now() AND fire_id"
                f" NOT IN (SELECT fire_id FROM {self.fires} WHERE job = $1"
                f"  ORDER BY fire_ms DESC LIMIT $2)",
                claim.job,
                self.history_cap,
            )
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
        async with self.pool.acquire() as conn, conn.transaction():
            if shard is not None:
                raw = await conn.fetchval(
                    f"SELECT record FROM {self.fires} WHERE job = $1 AND fire_id = $2 FOR UPDATE",
                    job,
                    fire_id,
                )
                record = {} if raw is None else json.loads(raw)
                # An outcome recorded already (the shard's, once) is left alone.
                write = settle_shard(record, *shard, patch)
                patch = record
            else:
                write = True
            # A fire recorded lost stays lost: its node lost the run lease.
            outcome = "UPDATE 0"
            if write:
                outcome = await conn.execute(
                    f"UPDATE {self.fires} SET record = record || $3::jsonb"
                    f" WHERE job = $1 AND fire_id = $2"
                    f" AND record->>'status' IS DISTINCT FROM 'lost'",
                    job,
                    fire_id,
                    json.dumps(patch),
                )
            if release:
                await conn.execute(
                    f"UPDATE {self.jobs} SET running_fire = NULL, running_until = NULL"
                    f" WHERE job = $1 AND running_fire = $2",
                    job,
                    fire_id,
                )
        return bool(outcome == "UPDATE 1")

    async def renew(self, job: str, fire_id: str, lease_ms: int) -> bool:
        updated = await self.pool.fetchval(
            f"UPDATE {self.jobs} SET running_until = now() + $3 * interval '1 millisecond'"
            f" WHERE job = $1 AND running_fire = $2 RETURNING 1",
            job,
            fire_id,
            lease_ms,
        )
        return updated is not None

    async def keep_running(
        self, job: str, fire_id: str, lease_ms: int, *, attempt: int | None = None, node: str = ""
    ) -> bool:
        """One statement, like ``alive.lua``: renew the run lease and, before an attempt,
        record the fire running; a lapsed lease records it lost instead.  SET sees the
        row as it was, and the row lock orders this against :meth:`reap_lost`."""
        lost = _lost("record", "(record->>'status')")
        alive = await self.pool.fetchval(
            f"WITH renewed AS (UPDATE {self.fires} SET"
            f" run_until = CASE WHEN run_until > now()"
            f"  THEN now() + $3::bigint * interval '1 millisecond' END,"
            f" retain_until = CASE WHEN run_until > now()"
            f"  THEN now() + $3::bigint * interval '1 millisecond' + (retain_until - run_until)"
            f"  ELSE retain_until END,"
            f" record = CASE"
            f"  WHEN run_until <= now() THEN {lost}"
            f"  WHEN $4::int IS NULL THEN record"
            f"  ELSE record || jsonb_build_object('status', 'running', 'attempt', $4::int,"
            f"   'node', $5::text) || CASE WHEN record->>'status' = 'running' THEN '{{}}'::jsonb"
            f"   ELSE jsonb_build_object('started_at', {_NOW_MS}) END"
            f" END"
            f" WHERE job = $1 AND fire_id = $2 AND run_until IS NOT NULL"
            f"  AND record->>'status' IN ('claimed', 'running')"
            f" RETURNING run_until IS NOT NULL AS alive)"
            # No row at all: trimmed by the history cap, not reaped; the run goes on.
            f" SELECT coalesce((SELECT alive FROM renewed),"
            f"  NOT EXISTS (SELECT 1 FROM {self.fires} WHERE job = $1 AND fire_id = $2))",
            job,
            fire_id,
            lease_ms,
            attempt,
            node,
        )
        return bool(alive)

    async def reap_lost(
        self, job: str, limit: int = 1000, members: Sequence[str] | None = None
    ) -> list[str]:
        rows = await self.pool.fetch(
            f"WITH due AS (SELECT fire_id, record->>'status' AS before FROM {self.fires}"
            f"  WHERE job = $1 AND run_until < now() LIMIT $2 FOR UPDATE SKIP LOCKED)"
            f" UPDATE {self.fires} f SET run_until = NULL, record = CASE"
            f"  WHEN due.before IN ('claimed', 'running') THEN {_lost('f.record', 'due.before')}"
            f"  ELSE f.record END"
            f" FROM due WHERE f.job = $1 AND f.fire_id = due.fire_id"
            f" RETURNING f.fire_id, due.before",
            job,
            limit,
        )
        return [r["fire_id"] for r in rows if r["before"] in ("claimed", "running")]

    async def has_runs(self, job: str) -> bool:
        return bool(
            await self.pool.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {self.fires}"
                " WHERE job = $1 AND run_until IS NOT NULL)",
                job,
            )
        )

    async def track_one_off(self, job: str) -> None:
        return None  # the fire rows holding a run lease say it (one_off_names)

    async def one_off_names(self) -> dict[str, float]:
        rows = await self.pool.fetch(
            f"SELECT DISTINCT job FROM {self.fires} WHERE run_until IS NOT NULL"
        )
        return {r["job"]: 0.0 for r in rows}

    async def untrack_one_off(self, job: str, token: float) -> None:
        return None

    async def forget_retired(self) -> int:
        # A fire row is also its claim: it stays until claim_until whatever the retention.
        deleted = await self.pool.fetchval(
            f"WITH gone AS (DELETE FROM {self.fires}"
            f" WHERE retain_until < now() AND claim_until < now() RETURNING 1)"
            f" SELECT count(*) FROM gone"
        )
        await self.pool.execute(
            f"DELETE FROM {self.jobs} j WHERE retain_until < now()"
            f" AND NOT EXISTS (SELECT 1 FROM {self.fires} f WHERE f.job = j.job)"
        )
        return int(deleted)

    async def history(self, job: str, limit: int) -> list[dict[str, Any]]:
        # A fire's row is also its claim, kept until claim_until so that no fire is
        # claimed twice: the history shows the newest history_cap of them.
        rows = await self.pool.fetch(
            f"SELECT record FROM {self.fires} WHERE job = $1 ORDER BY fire_ms DESC LIMIT $2",
            job,
            min(limit, self.history_cap),
        )
        return [json.loads(r["record"]) for r in rows]

    async def record(self, job: str, fire_id: str) -> dict[str, Any] | None:
        raw = await self.pool.fetchval(
            f"SELECT record FROM {self.fires} WHERE job = $1 AND fire_id = $2", job, fire_id
        )
        return None if raw is None else dict(json.loads(raw))

    async def set_paused(self, job: str, paused: bool) -> None:
        await self.pool.execute(
            f"INSERT INTO {self.jobs} (job, paused) VALUES ($1, $2)"
            f" ON CONFLICT (job) DO UPDATE SET paused = $2",
            job,
            paused,
        )
        await self.wake()

    async def push_trigger(self, entry: dict[str, Any]) -> None:
        await self._enqueue("trigger", 0, entry)

    async def due_triggers(self, limit: int) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"SELECT entry FROM {self.queue} WHERE kind = 'trigger' ORDER BY id LIMIT $1",
            limit,
        )
        return [json.loads(r["entry"]) for r in rows]

    async def drop_trigger(self, entry: dict[str, Any]) -> None:
        await self.pool.execute(
            f"DELETE FROM {self.queue} WHERE kind = 'trigger' AND entry->>'fire_id' = $1",
            str(entry.get("fire_id")),
        )

    async def add_once(self, entry: dict[str, Any], at_ms: int) -> None:
        await self._enqueue("once", at_ms, entry)

    async def _enqueue(self, kind: str, due_ms: int, entry: dict[str, Any]) -> None:
        await self.pool.execute(
            f"INSERT INTO {self.queue} (kind, due_ms, entry) VALUES ($1, $2, $3::jsonb)",
            kind,
            due_ms,
            json.dumps(entry),
        )
        await self.wake()

    async def due_once(self, now_ms: int, limit: int) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"SELECT entry FROM {self.queue} WHERE kind = 'once' AND due_ms <= $1"
            f" ORDER BY due_ms LIMIT $2",
            now_ms,
            limit,
        )
        return [json.loads(r["entry"]) for r in rows]

    async def next_once_ms(self) -> int | None:
        value = await self.pool.fetchval(
            f"SELECT min(due_ms) FROM {self.queue} WHERE kind = 'once'"
        )
        return None if value is None else int(value)

    async def drop_once(self, entry: dict[str, Any]) -> None:
        await self.pool.execute(
            f"DELETE FROM {self.queue} WHERE kind = 'once' AND entry->>'fire_id' = $1",
            str(entry.get("fire_id")),
        )

    async def wake(self) -> None:
        await self.pool.execute("SELECT pg_notify($1, '1')", self.channel)

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def wait_wakeup(self, seconds: float) -> bool:
        if self._listener is None:
            conn = await self.pool.acquire()
            await conn.add_listener(self.channel, self._on_notify)
            self._listener = conn
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))
        woken = self._wake.is_set()
        self._wake.clear()
        return woken
