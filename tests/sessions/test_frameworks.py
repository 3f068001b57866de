"""``request.session``, ``get_session()`` and the FastAPI dependency in Starlette, FastAPI,
Quart and websockets."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request

with warnings.catch_warnings():
    # Starlette nags about httpx in favour of httpx2; the TestClient works as before.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from asgi_dist import Dist, get_session
from asgi_dist.integrations.fastapi import SessionDep
from asgi_dist.scheduling import SchedulerConfig
from tests.conftest import SECRET_KEYS
from tests.sessions.app import build


async def test_fastapi_session_dependency_and_request_session_are_one_session(
    session_dist: Callable[..., Any],
) -> None:
    api = FastAPI()

    @api.post("/cart/{item}")
    async def add(item: str, session: SessionDep, request: Request) -> dict[str, Any]:
        assert session is request.session is get_session()
        session.setdefault("cart", [])
        session["cart"] = [*session["cart"], item]
        return {"cart": session["cart"]}

    @api.get("/cart")
    async def show(session: SessionDep) -> dict[str, Any]:
        return {"cart": session.get("cart", [])}

    dist = await session_dist("redis")
    transport = httpx.ASGITransport(app=dist.wrap(api))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        await c.post("/cart/apple")
        await c.post("/cart/pear")
        assert (await c.get("/cart")).json() == {"cart": ["apple", "pear"]}


async def test_quart_views_use_get_session(session_dist: Callable[..., Any]) -> None:
    from quart import Quart

    from asgi_dist.integrations.quart import init_app

    app = Quart(__name__)

    @app.post("/visit")
    async def visit() -> dict[str, Any]:
        session = get_session()
        session["visits"] = session.get("visits", 0) + 1
        return {"visits": session["visits"]}

    dist = await session_dist("redis")
    init_app(app, dist)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        for expected in (1, 2, 3):
            assert (await c.post("/visit")).json() == {"visits": expected}


def test_a_websocket_sees_the_session_and_its_changes_are_saved(
    redis_url: str, namespace: str
) -> None:
    dist = _redis_dist(redis_url, namespace)
    with TestClient(build(dist)) as c:
        assert c.post("/set/a/1").status_code == 200
        with c.websocket_connect("/ws") as ws:
            assert ws.receive_json() == {"data": {"a": "1"}}
            ws.send_text("b")
        assert c.get("/all").json()["data"] == {"a": "1", "b": "from-websocket"}


def test_a_websocket_loop_ended_by_the_client_closing_saves_its_changes(
    redis_url: str, namespace: str
) -> None:
    """Starlette ends such a loop by raising WebSocketDisconnect: a normal end."""
    dist = _redis_dist(redis_url, namespace)
    with TestClient(build(dist)) as c:
        assert c.post("/set/a/1").status_code == 200
        with c.websocket_connect("/ws-loop") as ws:
            ws.send_text("chat")
            assert ws.receive_text() == "ok"
            ws.close(1000)
        assert c.get("/all").json()["data"] == {"a": "1", "chat": "seen"}


def _redis_dist(redis_url: str, namespace: str) -> Dist:
    # TestClient runs the lifespan (which starts the Dist) in its own event loop.
    return Dist(
        redis_url,
        namespace=namespace,
        secret_keys=SECRET_KEYS,
        scheduler=SchedulerConfig(enabled=False),
    )
