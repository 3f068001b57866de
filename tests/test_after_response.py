"""What runs after the response (background tasks) is outside the request: its
locks are released when the response ends, and its session can no longer change."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dist import Dist, SessionError, get_locks, get_session


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_request_locks_are_released_when_the_response_ends_before_background_tasks() -> None:
    dist = Dist()
    seen: dict[str, Any] = {}
    done = asyncio.Event()

    async def after() -> None:
        # The response is out: another request may take the lock now.
        seen["locked_meanwhile"] = await dist.lock("order:1").locked()
        done.set()

    async def order(request: Request) -> JSONResponse:
        await get_locks().acquire("order:1", timeout=1)
        return JSONResponse({}, background=BackgroundTask(after))

    async with dist, _client(dist.wrap(Starlette(routes=[Route("/", order)]))) as client:
        assert (await client.get("/")).status_code == 200
        await asyncio.wait_for(done.wait(), 5)
    assert seen["locked_meanwhile"] is False


async def test_a_session_change_after_the_response_started_is_refused_not_lost() -> None:
    dist = Dist()
    errors: list[BaseException] = []

    async def after() -> None:
        try:
            get_session()["late"] = True
        except SessionError as exc:
            errors.append(exc)

    async def write(request: Request) -> JSONResponse:
        get_session()["early"] = True
        return JSONResponse({}, background=BackgroundTask(after))

    async def read(request: Request) -> JSONResponse:
        return JSONResponse(dict(get_session()))

    app = dist.wrap(Starlette(routes=[Route("/write", write), Route("/read", read)]))
    async with dist, _client(app) as client:
        await client.get("/write")
        assert (await client.get("/read")).json() == {"early": True}
    assert len(errors) == 1 and "before returning the response" in str(errors[0])


async def test_another_session_middleware_on_our_cookie_name_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dist = Dist()

    async def home(request: Request) -> JSONResponse:
        request.session["n"] = request.session.get("n", 0) + 1
        return JSONResponse({})

    inner = Starlette(routes=[Route("/", home)])
    inner.add_middleware(SessionMiddleware, secret_key="another-secret-key-0123456789")
    with caplog.at_level(logging.WARNING, logger="asgi_dist.sessions"):
        async with dist, _client(dist.wrap(inner)) as client:
            await client.get("/")
            await client.get("/")
    warnings = [r for r in caplog.records if "SessionMiddleware" in r.getMessage()]
    assert len(warnings) == 1  # once, not per request
    assert "SessionConfig(cookie_name=...)" in warnings[0].getMessage()
