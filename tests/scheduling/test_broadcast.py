"""A broadcast fire settles to one final status once every shard reported.

Each shard's outcome is kept under ``shards["<index>"]``; the fire itself ends
``succeeded`` when every shard succeeded, else ``failed`` if any failed (else the
status of the lowest shard that did not succeed), with that shard named in ``error``.
"""

from __future__ import annotations

from typing import Any

import pytest

from asgi_dist.scheduling import JobContext
from tests.scheduling.test_claim import claim, open_store
from tests.scheduling.test_jobs import NEVER, leading, settle


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_a_broadcast_fire_settles_once_every_shard_reported(
    sched_dist: Any, backend: str
) -> None:
    store = await open_store(sched_dist, backend)
    fire_ms = await store.now_ms() - 5000
    outcomes = {"ok": ["succeeded"] * 3, "bad": ["succeeded", "failed", "cancelled"]}
    for name, statuses in outcomes.items():
        fire_id = f"{name}:{fire_ms}"
        taken = claim(
            fire_ms, job=name, fire_id=fire_id, expected=None, advance=False, signature=""
        )
        assert (await store.claim(taken)).status == "claimed"
        await store.finish(name, fire_id, {"status": "dispatched"}, release=False)
        for index in (2, 0, 1):  # shards finish in any order
            rec = await store.record(name, fire_id)
            assert rec is not None and rec["status"] == "dispatched", rec
            error = None if statuses[index] == "succeeded" else f"attempt 2: boom {index}"
            patch = {"status": statuses[index], "attempt": index + 1, "error": error}
            await store.finish(name, fire_id, patch, release=False, shard=(index, 3))
    ok = await store.record("ok", f"ok:{fire_ms}")
    assert ok is not None and ok["status"] == "succeeded" and ok["error"] is None, ok
    assert ok["attempt"] == 3 and ok["shard_total"] == 3
    assert [ok["shards"][str(i)]["status"] for i in range(3)] == ["succeeded"] * 3
    bad = await store.record("bad", f"bad:{fire_ms}")
    assert bad is not None and bad["status"] == "failed", bad
    assert bad["error"] == "shard 1 of 3: attempt 2: boom 1", bad
    assert bad["shards"]["2"]["status"] == "cancelled"


async def test_a_broadcast_fire_records_its_final_status_and_each_shard(sched_dist: Any) -> None:
    dist = await sched_dist(start=False)

    @dist.cron(NEVER, broadcast=True)
    async def fanout(ctx: JobContext) -> None:
        if ctx.payload == "fail":
            raise RuntimeError(f"shard {ctx.shard_index} broke")

    await dist.start()
    await leading(dist)
    fire_id = await dist.scheduler.trigger("fanout")
    record = await settle(dist, "fanout", fire_id)
    assert record["status"] == "succeeded" and record["attempt"] == 1, record
    assert record["shards"]["0"]["status"] == "succeeded", record
    assert record["shard_total"] == 1 and record["members"] == [dist.runtime.node_id]
    fire_id = await dist.scheduler.trigger("fanout", payload="fail")
    record = await settle(dist, "fanout", fire_id)
    assert record["status"] == "failed", record
    assert record["error"] == "shard 0 of 1: attempt 1: RuntimeError: shard 0 broke", record
