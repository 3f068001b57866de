"""A store that is down costs a 503 with Retry-After, never a 500 or a hang, and recovery
needs nothing but the store coming back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_dist import BackendUnavailable, get_session
from tests.helpers.servers import RedisServer
from tests.sessions.conftest import PostgresServer, client


async def test_redis_stopped_mid_run_gives_503_then_recovers(
    session_dist: Callable[..., Any], redis_server: RedisServer
) -> None:
    dist = await session_dist("redis", redis=redis_server.url, store_timeout=1.0)
    async with client(dist) as c:
        assert (await c.post("/set/k/v")).status_code == 200
        redis_server.kill()
        for call in (c.get("/get/k"), c.post("/set/k/w")):
            r = await call
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert "Traceback" not in r.text
        redis_server.start()  # same port, empty: the session is gone, the app works
        r = await c.get("/get/k")
        assert r.status_code == 200 and r.json()["value"] is None
        assert (await c.post("/set/k/again")).status_code == 200
        assert (await c.get("/get/k")).json()["value"] == "again"


async def test_a_paused_redis_gives_503_after_store_timeout_instead_of_hanging(
    session_dist: Callable[..., Any], redis_server: RedisServer
) -> None:
    dist = await session_dist("redis", redis=redis_server.url, store_timeout=0.5)
    async with client(dist) as c:
        assert (await c.post("/set/k/v")).status_code == 200
        redis_server.pause()
        try:
            r = await c.get("/get/k")
            assert r.status_code == 503
        finally:
            redis_server.resume()
        r = await c.get("/get/k")
        assert r.status_code == 200 and r.json()["value"] == "v"


async def test_a_save_that_fails_turns_the_response_into_503_not_a_silent_success(
    session_dist: Callable[..., Any], redis_server: RedisServer
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_write(request: Request) -> PlainTextResponse:
        request.session["k"] = "new"
        entered.set()
        await release.wait()  # the store goes away between the load and the save
        return PlainTextResponse("saved?")

    dist = await session_dist("redis", redis=redis_server.url, store_timeout=1.0)
    app = dist.wrap(Starlette(routes=[Route("/slow", slow_write, methods=["POST"])]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        pending = asyncio.ensure_future(c.post("/slow"))
        await asyncio.wait_for(entered.wait(), 10)
        redis_server.kill()
        release.set()
        r = await asyncio.wait_for(pending, 10)
        assert r.status_code == 503 and r.text != "saved?"
        assert "set-cookie" not in r.headers


async def test_postgres_stopped_mid_run_gives_503_then_recovers_with_the_session_intact(
    session_dist: Callable[..., Any], postgres_server: PostgresServer
) -> None:
    dist = await session_dist("postgres", postgres=postgres_server.dsn, store_timeout=2.0)
    async with client(dist) as c:
        assert (await c.post("/set/k/v")).status_code == 200
        postgres_server.stop()
        for call in (c.get("/get/k"), c.post("/set/k/w")):
            r = await asyncio.wait_for(call, 10)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert "Traceback" not in r.text
        # A request without a cookie needs no store: it is served during the outage.
        async with client(dist) as fresh:
            assert (await fresh.get("/get/k")).status_code == 200
        postgres_server.start()  # same data directory: the session survived
        r = await c.get("/get/k")
        assert r.status_code == 200 and r.json()["value"] == "v"
        assert (await c.post("/set/k/again")).status_code == 200
        assert (await c.get("/get/k")).json()["value"] == "again"


async def test_a_paused_postgres_gives_503_after_store_timeout_instead_of_hanging(
    session_dist: Callable[..., Any], postgres_server: PostgresServer
) -> None:
    dist = await session_dist("postgres", postgres=postgres_server.dsn, store_timeout=0.5)
    async with client(dist) as c:
        assert (await c.post("/set/k/v")).status_code == 200
        postgres_server.pause()
        try:
            r = await asyncio.wait_for(c.get("/get/k"), 10)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        finally:
            postgres_server.resume()
        r = await asyncio.wait_for(c.get("/get/k"), 10)
        assert r.status_code == 200 and r.json()["value"] == "v"


@pytest.mark.parametrize("framework", ["starlette", "quart"])
async def test_a_view_that_logs_out_during_a_pause_gets_503_not_a_500(
    framework: str, session_dist: Callable[..., Any], redis_server: RedisServer
) -> None:
    """Starlette and Quart answer what they have no handler for with their own 500: a
    store outage inside a view must reach them as BackendUnavailable, the error
    asgi_dist teaches them to answer with 503."""
    dist = await session_dist("redis", redis=redis_server.url, store_timeout=0.5)

    async def set_key() -> str:
        get_session()["k"] = "v"
        return ""

    async def logout() -> str:
        redis_server.pause()  # after the session was loaded
        await get_session().invalidate()
        return ""

    app: Any
    if framework == "quart":
        from quart import Quart

        from asgi_dist.integrations.quart import init_app

        app = Quart(__name__)
        app.post("/set", endpoint="set")(set_key)
        app.post("/logout", endpoint="logout")(logout)
        init_app(app, dist)
    else:

        def view(step: Callable[[], Any]) -> Callable[[Request], Any]:
            async def endpoint(request: Request) -> PlainTextResponse:
                await step()
                return PlainTextResponse("")

            return endpoint

        routes = [Route(f"/{f.__name__.replace('_key', '')}", view(f), methods=["POST"])
                  for f in (set_key, logout)]  # fmt: skip
        app = dist.wrap(Starlette(routes=routes))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        assert (await c.post("/set")).status_code == 200
        try:
            r = await asyncio.wait_for(c.post("/logout"), 10)
        finally:
            redis_server.resume()
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text[:200]


async def test_logout_everywhere_outside_a_request_raises_backend_unavailable_on_an_outage(
    session_dist: Callable[..., Any], redis_server: RedisServer
) -> None:
    dist = await session_dist("redis", redis=redis_server.url, store_timeout=0.5)
    redis_server.pause()
    try:
        with pytest.raises(BackendUnavailable, match=r"store_timeout=0\.5"):
            await asyncio.wait_for(dist.sessions.invalidate_user("frank"), 10)
    finally:
        redis_server.resume()
    redis_server.kill()
    with pytest.raises(BackendUnavailable, match="session store"):
        await asyncio.wait_for(dist.sessions.list_user("frank"), 10)


async def test_postgres_logout_everywhere_outside_a_request_raises_backend_unavailable(
    session_dist: Callable[..., Any], postgres_server: PostgresServer
) -> None:
    dist = await session_dist("postgres", postgres=postgres_server.dsn, store_timeout=2.0)
    assert await dist.sessions.invalidate_user("frank") == 0
    postgres_server.stop()
    with pytest.raises(BackendUnavailable, match="session store"):
        await asyncio.wait_for(dist.sessions.invalidate_user("frank"), 10)
