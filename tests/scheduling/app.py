"""A Starlette app whose scheduler lives in the ASGI lifespan (run by uvicorn in tests).

Jobs append their fire id to the Redis list ``<namespace>:runs``; ``GET /jobs``
answers from this process's scheduler, ``POST /trigger`` triggers a job from it.
"""

from __future__ import annotations

import json
import os

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dist import Dist
from asgi_dist.scheduling import JobContext
from asgi_dist.transactions import TransactionConfig

dist = Dist.from_env(sessions=False, transactions=TransactionConfig(enabled=False))
_client = aioredis.Redis.from_url(os.environ["ASGI_DIST_REDIS_URL"])
_runs = f"{dist.namespace}:runs"


@dist.every(seconds=0.5)
async def pulse(ctx: JobContext) -> None:
    entry = {"fire_id": ctx.fire_id, "pid": os.getpid(), "fence": ctx.fence}
    await _client.rpush(_runs, json.dumps(entry))


async def jobs(request: Request) -> JSONResponse:
    listed = await dist.scheduler.jobs()
    return JSONResponse(
        {
            "leading": dist.scheduler.leading,
            "jobs": [{**j, "next_fire": str(j["next_fire"])} for j in listed],
        }
    )


async def trigger(request: Request) -> JSONResponse:
    return JSONResponse({"fire_id": await dist.scheduler.trigger("pulse")})


app = dist.wrap(
    Starlette(routes=[Route("/jobs", jobs), Route("/trigger", trigger, methods=["POST"])])
)
