"""A Dist started again on a new event loop works as on its first.

Two ``with TestClient(app):`` blocks in a row run the app's lifespan on two event
loops, and so does ``asyncio.run`` called twice: a common pattern in test suites.
Everything a Dist keeps between a stop and the next start (its watchdog, its
stores, its consumers) must not stay bound to the first loop, or, on the second,
renewals stop (the lease expires under its holder unnoticed), jobs stop firing
and messages stop arriving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from asgi_dist import Dist, get_locks, get_session, get_tx
from asgi_dist.scheduling import JobContext
from asgi_dist.sessions import SessionConfig
from tests.conftest import SECRET_KEYS


def _until(check: Callable[[], bool], what: str, bound: float = 10.0) -> None:
    deadline = time.monotonic() + bound
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound}s: {what}")
        time.sleep(0.02)


def _app(dist: Dist, *, postgres: bool) -> Starlette:
    async def visit(request: Request) -> JSONResponse:
        session = get_session()
        session["visits"] = session.get("visits", 0) + 1
        return JSONResponse({"visits": session["visits"]})

    async def hold(request: Request) -> JSONResponse:
        # Longer than the ttl: only the watchdog's renewals keep it.
        async with dist.lock("hold", ttl=0.6, timeout=5) as held:
            await asyncio.sleep(1.5)
        request_lock = await get_locks().acquire("request", timeout=1, ttl=0.6)
        await asyncio.sleep(1.0)
        return JSONResponse({"fence": held.fence, "request_fence": request_lock.fence})

    async def wake(request: Request) -> JSONResponse:
        # A waiter woken by the release (LISTEN/NOTIFY on PostgreSQL), not by a poll.
        backend = request.query_params["backend"]
        lock = dist.lock("wake", ttl=5, backend=backend)  # type: ignore[arg-type]
        first = await lock.acquire()
        waiter = asyncio.create_task(lock.acquire(timeout=5))
        await asyncio.sleep(0.2)
        await first.release()
        second = await waiter
        await second.release()
        # None while the backend listens for releases (it would poll without).
        polls = dist.locks.backend(backend).poll_interval  # type: ignore[arg-type]
        return JSONResponse({"fences": [first.fence, second.fence], "polls": polls})

    async def lead(request: Request) -> JSONResponse:
        election = dist.election("boss", ttl=3.0, renew_deadline=2.0, retry=0.5)
        async with election.leadership() as term:
            return JSONResponse({"term": term.fence})

    async def order(request: Request) -> JSONResponse:
        await get_tx().publish("orders", {"n": int(request.query_params["n"])})
        return JSONResponse({}, status_code=201)

    routes = [
        Route("/visit", visit),
        Route("/hold", hold),
        Route("/lead", lead),
        Route("/wake", wake),
    ]
    if postgres:
        routes.append(Route("/order", order, methods=["POST"]))
    return dist.wrap(Starlette(routes=routes))


@pytest.mark.parametrize("servers", ["memory", "redis+postgres"])
def test_a_dist_started_again_on_a_new_event_loop_works_as_on_its_first(
    servers: str, redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    with_servers = servers != "memory"
    config: dict[str, Any] = {"namespace": namespace, "leader_ttl": 3.0}
    if with_servers:
        config.update(
            redis=redis_url,
            postgres=postgres_dsn,
            secret_keys=SECRET_KEYS,
            sessions=SessionConfig(near_cache=True),
        )
    dist = Dist(**config)
    ticks: list[int] = []
    orders: list[int] = []

    @dist.every(0.2, name="tick")
    async def tick(ctx: JobContext) -> None:
        ticks.append(1)

    if with_servers:

        @dist.consumer("orders", group="g")
        async def consume(message: Any, tx: Any) -> None:
            orders.append(message.payload["n"])

    app = _app(dist, postgres=with_servers)
    for run in (1, 2):
        with TestClient(app) as client:
            assert client.get("/visit").json() == {"visits": 1}
            assert client.get("/visit").json() == {"visits": 2}
            held = client.get("/hold")
            assert held.status_code == 200, held.text
            assert client.get("/lead").status_code == 200
            backends = ["redis", "postgres"] if with_servers else ["memory"]
            for backend in backends:
                woken = client.get(f"/wake?backend={backend}")
                assert woken.status_code == 200, woken.text
                assert woken.json()["polls"] is None, f"run {run}: {backend} waiters poll"
            seen = len(ticks)
            _until(lambda seen=seen: len(ticks) >= seen + 2, f"run {run}: the job fired")
            if with_servers:
                assert client.post(f"/order?n={run}").status_code == 201
                _until(lambda run=run: run in orders, f"run {run}: the message consumed")
        assert not dist.started
    assert dist.start_count == 2
