"""The scheduler is hosted in the ASGI lifespan of every uvicorn process."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import redis.asyncio as aioredis

from tests.helpers.processes import ProcessGroup


async def test_uvicorn_processes_share_one_schedule_and_trigger_from_any_of_them(
    processes: ProcessGroup, redis_url: str, namespace: str, redis_client: aioredis.Redis
) -> None:
    env = {
        "ASGI_DIST_REDIS_URL": redis_url,
        "ASGI_DIST_NAMESPACE": namespace,
        "ASGI_DIST_LEADER_TTL": "2",
    }
    servers = processes.uvicorn("tests.scheduling.app:app", 2, env=env)
    async with httpx.AsyncClient(timeout=10) as http:
        deadline = time.monotonic() + 20
        states = []
        while time.monotonic() < deadline:
            states = [(await http.get(f"{s.url}/jobs")).json() for s in servers]
            if any(s["leading"] for s in states):
                break
            await asyncio.sleep(0.05)
        assert [s["leading"] for s in states].count(True) == 1, states
        follower = servers[[s["leading"] for s in states].index(False)]
        assert states[0]["jobs"][0]["name"] == "pulse"
        fire_id = (await http.post(f"{follower.url}/trigger")).json()["fire_id"]
        await asyncio.sleep(2.0)
    for server in servers:
        # uvicorn re-raises SIGTERM after a clean lifespan shutdown (-15)
        assert server.terminate() in (0, -15), server.output()
        assert "Traceback" not in server.output(), server.output()
    runs = [json.loads(r) for r in await redis_client.lrange(f"{namespace}:runs", 0, -1)]
    fire_ids = [r["fire_id"] for r in runs]
    assert fire_id in fire_ids, "the trigger sent to the follower did not run"
    assert not [f for f, n in Counter(fire_ids).items() if n > 1]
    assert len(fire_ids) >= 4
