"""Everything that talks to Redis and PostgreSQL also runs on uvloop.

uvicorn runs on uvloop whenever it is installed (``uvicorn[standard]``), and
uvloop's transports are not ``asyncio.Transport`` subclasses: the multiplexed
Redis connection and the pub/sub hub once refused them, so ``dist.start()``
timed out on every uvloop deployment.
"""

from __future__ import annotations

import asyncio

import httpx
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dist import Dist, DistMiddleware
from tests.conftest import SECRET_KEYS


def test_locks_sessions_and_pubsub_work_on_uvloop(
    redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        dist = Dist(
            redis=redis_url, postgres=postgres_dsn, namespace=namespace, secret_keys=SECRET_KEYS
        )

        async def visit(request: Request) -> JSONResponse:
            request.session["n"] = request.session.get("n", 0) + 1
            async with dist.lock("visit", ttl=5.0, timeout=5.0) as held:
                return JSONResponse({"n": request.session["n"], "fence": held.fence})

        app = DistMiddleware(Starlette(routes=[Route("/", visit)]), dist=dist)
        await dist.start()
        try:
            assert dist.runtime.redis is not None
            assert dist.runtime.redis.multiplexed is not None  # the connection at issue

            # Pub/sub through the hub's own connection.
            got: list[bytes | None] = []
            heard = asyncio.Event()

            def listen(payload: bytes | None) -> None:
                got.append(payload)
                heard.set()

            sub = await dist.runtime.pubsub.subscribe(f"{namespace}:news", listen)
            assert await dist.runtime.pubsub.publish(f"{namespace}:news", b"hi") == 1
            async with asyncio.timeout(5):
                await heard.wait()
            sub.close()
            assert got == [b"hi"]

            # A contended lock: waiters are woken through pub/sub and handed the lease.
            fences: list[int] = []

            async def contend() -> None:
                for _ in range(20):
                    async with dist.lock("counter", ttl=5.0, timeout=10.0) as held:
                        fences.append(held.fence)
                        await asyncio.sleep(0)

            await asyncio.gather(*(contend() for _ in range(4)))
            assert len(fences) == 80 and fences == sorted(set(fences))

            # Sessions and a request-time lock through the middleware.
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
                first = (await client.get("/")).json()
                second = (await client.get("/")).json()
            assert [first["n"], second["n"]] == [1, 2]
            assert first["fence"] < second["fence"]
        finally:
            await dist.stop()

    uvloop.run(scenario())
