"""The claim, on every backend: the one atomic step behind "at most one start per fire"."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asgi_dist.scheduling import SchedulerConfig
from asgi_dist.scheduling.store import Claim, SchedulerStore

BACKENDS = ["redis", "postgres", "memory"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def open_store(sched_dist: Any, backend: str) -> SchedulerStore:
    # A plain coroutine, not an async fixture: the Dist must live on the test's loop.
    # Not leading: the test plays the leader through the store itself.
    kwargs: dict[str, Any] = {"scheduler": SchedulerConfig(backend=backend, enabled=False)}
    if backend == "memory":
        kwargs.update(redis=None, postgres=None)
    dist = await sched_dist(**kwargs)
    return dist.scheduler.store


def claim(fire_ms: int, *, fence: int = 1, expected: int | None = -1, **kw: Any) -> Claim:
    fields: dict[str, Any] = {
        "job": "job",
        "fire_ms": fire_ms,
        "fire_id": f"job:{fire_ms}",
        "expected_next": fire_ms if expected == -1 else expected,
        "new_next": fire_ms + 1000,
        "advance": True,
        "fence": fence,
        "intent": "run",
        "record": {"fire_id": f"job:{fire_ms}", "fire_ms": fire_ms, "fence": fence},
        "overlap": "allow",
        "lease_ms": 5000,
        "claim_ttl_ms": 60_000,
        "signature": "sig",
    }
    fields.update(kw)
    return Claim(**fields)


async def start_sequence(store: SchedulerStore) -> int:
    now = await store.now_ms()
    first = now - 5000
    state = await store.init_job("job", "sig", first)
    assert state.next_ms == first
    return first


async def test_a_fire_is_claimed_once_and_the_sequence_advances(
    sched_dist: Any, backend: str
) -> None:
    store = await open_store(sched_dist, backend)
    first = await start_sequence(store)
    assert (await store.claim(claim(first))).status == "claimed"
    assert (await store.state("job")).next_ms == first + 1000
    # A second leader with the same (or a newer) term cannot take the same fire.
    again = await store.claim(claim(first, fence=2))
    assert again.status == "moved"
    again = await store.claim(claim(first, fence=2, expected=None, advance=False))
    assert again.status == "duplicate"
    history = await store.history("job", 10)
    assert [h["fire_id"] for h in history] == [f"job:{first}"]
    assert history[0]["status"] == "claimed" and history[0]["fence"] == 1


async def test_an_older_term_is_refused_once_a_newer_one_claimed(
    sched_dist: Any, backend: str
) -> None:
    store = await open_store(sched_dist, backend)
    first = await start_sequence(store)
    assert (await store.claim(claim(first, fence=5))).status == "claimed"
    stale = await store.claim(claim(first + 1000, fence=4))
    assert stale.status == "stale"
    assert (await store.state("job")).next_ms == first + 1000


async def test_a_fire_in_the_future_of_the_server_clock_is_not_claimed(
    sched_dist: Any, backend: str
) -> None:
    store = await open_store(sched_dist, backend)
    now = await store.now_ms()
    await store.init_job("job", "sig", now + 60_000)
    assert (await store.claim(claim(now + 60_000))).status == "early"


async def test_a_new_schedule_signature_restarts_the_sequence(
    sched_dist: Any, backend: str
) -> None:
    store = await open_store(sched_dist, backend)
    first = await start_sequence(store)
    await store.init_job("job", "sig2", first + 7)
    assert (await store.claim(claim(first))).status == "moved"
    assert (await store.state("job")).next_ms == first + 7


async def test_paused_and_missed_fires_are_recorded_not_run(sched_dist: Any, backend: str) -> None:
    store = await open_store(sched_dist, backend)
    first = await start_sequence(store)
    assert (await store.claim(claim(first, intent="missed"))).status == "missed"
    await store.set_paused("job", True)
    assert (await store.claim(claim(first + 1000))).status == "paused"
    await store.set_paused("job", False)
    assert (await store.claim(claim(first + 2000))).status == "claimed"
    statuses = [h["status"] for h in await store.history("job", 10)]
    assert statuses == ["claimed", "paused", "missed"]


async def test_overlap_forbid_skips_while_the_running_lease_is_held(
    sched_dist: Any, backend: str
) -> None:
    store = await open_store(sched_dist, backend)
    first = await start_sequence(store)
    assert (await store.claim(claim(first, overlap="forbid"))).status == "claimed"
    assert (await store.claim(claim(first + 1000, overlap="forbid"))).status == "skipped"
    assert await store.renew("job", f"job:{first}", 5000)
    await store.finish("job", f"job:{first}", {"status": "succeeded"}, release=True)
    assert not await store.renew("job", f"job:{first}", 5000)
    assert (await store.claim(claim(first + 2000, overlap="forbid"))).status == "claimed"
    records = {h["fire_id"]: h for h in await store.history("job", 10)}
    assert records[f"job:{first}"]["status"] == "succeeded"
    assert "overlap" in records[f"job:{first + 1000}"]["error"]


async def test_overlap_replace_hands_the_running_lease_to_the_newer_fire(
    sched_dist: Any, backend: str
) -> None:
    store = await open_store(sched_dist, backend)
    first = await start_sequence(store)
    assert (await store.claim(claim(first, overlap="replace"))).status == "claimed"
    assert (await store.claim(claim(first + 1000, overlap="replace"))).status == "claimed"
    assert not await store.renew("job", f"job:{first}", 5000)
    assert await store.renew("job", f"job:{first + 1000}", 5000)


async def test_history_is_capped(sched_dist: Any) -> None:
    dist = await sched_dist(scheduler=SchedulerConfig(history_limit=3, enabled=False))
    store = dist.scheduler.store
    first = await start_sequence(store)
    for i in range(6):
        assert (await store.claim(claim(first + i * 1000))).status == "claimed"
    history = await store.history("job", 10)
    assert [h["fire_ms"] for h in history] == [first + i * 1000 for i in (5, 4, 3)]


async def test_triggers_and_one_offs_queue_for_the_leader(sched_dist: Any, backend: str) -> None:
    store = await open_store(sched_dist, backend)
    await store.push_trigger({"job": "a", "fire_id": "a:1:trigger"})
    await store.push_trigger({"job": "b", "fire_id": "b:1:trigger"})
    due = await store.due_triggers(10)
    assert [t["job"] for t in due] == ["a", "b"]
    assert await store.due_triggers(10) == due  # queued until dropped
    for entry in due:
        await store.drop_trigger(entry)
    assert await store.due_triggers(10) == []
    now = await store.now_ms()
    entry = {"job": "x", "fire_id": f"x:{now}:once", "fire_ms": now}
    await store.add_once(entry, now)
    await store.add_once({"job": "y", "fire_id": "y", "fire_ms": now + 10**6}, now + 10**6)
    assert await store.due_once(now, 10) == [entry]
    assert await store.next_once_ms() == now
    await store.drop_once(entry)
    assert await store.due_once(now, 10) == []


async def test_concurrent_claimers_take_each_fire_exactly_once(
    sched_dist: Any, backend: str
) -> None:
    """20 would-be leaders race over one sequence: no fire twice, none skipped."""
    store = await open_store(sched_dist, backend)
    first = await start_sequence(store)
    fires = [first + i * 1000 for i in range(5)]  # all already due
    won: list[int] = []

    async def contender(fence: int) -> None:
        for _ in range(50):  # bounded: a contender gives up after 50 attempts
            state = await store.state("job")
            if state.next_ms is None or state.next_ms > fires[-1]:
                return
            result = await store.claim(claim(state.next_ms, fence=fence))
            if result.status == "claimed":
                won.append(state.next_ms)

    # One shared fence: the strongest case, two leaders believing in the same term.
    await asyncio.gather(*(contender(1) for _ in range(20)))
    assert sorted(won) == fires
    history = await store.history("job", 20)
    assert sorted(h["fire_ms"] for h in history) == fires
