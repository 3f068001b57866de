"""Overlapping requests of one session lose nothing: only changed keys are written."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.sessions.conftest import client


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_100_concurrent_requests_each_setting_its_own_key_all_persist(
    backend: str, session_dist: Callable[..., Any]
) -> None:
    dist = await session_dist(backend)
    async with client(dist) as c:
        await c.post("/set/seed/0")
        cookie = {"cookie": f"session={c.cookies['session']}"}
        async with client(dist) as other:
            # Every request loads the same state, then writes its own key.
            responses = await asyncio.gather(
                *(other.post(f"/set/k{i}/{i}", headers=cookie) for i in range(100))
            )
        assert all(r.status_code == 200 for r in responses)
        data = (await c.get("/all")).json()["data"]
        assert data == {"seed": "0", **{f"k{i}": str(i) for i in range(100)}}


async def test_the_same_key_written_concurrently_keeps_one_of_the_written_values(
    session_dist: Callable[..., Any],
) -> None:
    dist = await session_dist("redis")
    async with client(dist) as c:
        await c.post("/set/k/start")
        cookie = {"cookie": f"session={c.cookies['session']}"}
        await asyncio.gather(*(c.post(f"/set/k/v{i}", headers=cookie) for i in range(20)))
        # Last writer wins: the value is one that a request wrote, never a mix or a loss.
        assert (await c.get("/get/k")).json()["value"] in {f"v{i}" for i in range(20)}


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_the_last_writer_of_a_key_wins_even_writing_the_value_it_loaded(
    backend: str, session_dist: Callable[..., Any]
) -> None:
    # A user switches a setting back in one tab while another tab changes it:
    # the switch back, written last, is what stays.
    dist = await session_dist(backend)
    async with client(dist) as c:
        await c.post("/set/theme/dark")
        cookie = {"cookie": f"session={c.cookies['session']}"}
        slow = asyncio.create_task(c.post("/set/theme/dark?pause=0.5", headers=cookie))
        await asyncio.sleep(0.1)  # the slow request has loaded "dark"
        assert (await c.post("/set/theme/light", headers=cookie)).status_code == 200
        answer = await slow
        assert answer.json()["loaded"] == "dark"
        assert (await c.get("/get/theme")).json()["value"] == "dark"


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_concurrent_requests_cannot_grow_the_stored_session_past_max_size(
    backend: str, session_dist: Callable[..., Any]
) -> None:
    """Each request's own view is under max_size; the store refuses the merge over it."""
    dist = await session_dist(backend, max_size=1000)
    big = "x" * 600
    async with client(dist) as c:
        await c.post("/set/seed/0")
        cookie = {"cookie": f"session={c.cookies['session']}"}
        # Both load the session before either writes (the pause comes after the load).
        first, second = await asyncio.gather(
            c.post(f"/set/a/{big}?pause=0.3", headers=cookie),
            c.post(f"/set/b/{big}?pause=0.3", headers=cookie),
        )
        assert sorted([first.status_code, second.status_code]) == [200, 500]
        data = (await c.get("/all")).json()["data"]
        assert set(data) in ({"seed", "a"}, {"seed", "b"})
        # The session is not stuck: a small write still goes through.
        assert (await c.post("/set/tiny/1")).status_code == 200
