"""The session test app: a few endpoints over ``request.session`` and ``get_session()``.

``build(dist)`` wraps it for in-process tests; ``served.py`` builds one from the
environment for real uvicorn processes.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from asgi_dist import Dist, SessionTooLarge, get_session
from asgi_dist.middleware import DistMiddleware


async def read(request: Request) -> JSONResponse:
    key = request.path_params["key"]
    return JSONResponse({"value": request.session.get(key), "pid": os.getpid()})


async def read_all(request: Request) -> JSONResponse:
    session = get_session()
    return JSONResponse({"data": dict(session), "user": session.user_id, "pid": os.getpid()})


async def write(request: Request) -> JSONResponse:
    # get_session() and request.session are the same object.
    assert get_session() is request.session
    key = request.path_params["key"]
    loaded = request.session.get(key)  # loaded before the pause: a slow writer
    await asyncio.sleep(float(request.query_params.get("pause", 0)))
    request.session[key] = request.path_params["value"]
    return JSONResponse({"ok": True, "pid": os.getpid(), "loaded": loaded})


async def write_big(request: Request) -> Response:
    try:
        request.session["big"] = "x" * int(request.path_params["size"])
    except SessionTooLarge as exc:
        return PlainTextResponse(str(exc), status_code=413)
    return PlainTextResponse("stored")


async def put(request: Request) -> PlainTextResponse:
    """Set every key of the JSON body (any JSON value, lone surrogates included)."""
    for key, value in json.loads(await request.body()).items():
        request.session[key] = value
    return PlainTextResponse("stored")


async def show(request: Request) -> PlainTextResponse:
    """The session as Python's repr: exact types, and ASCII whatever the values."""
    return PlainTextResponse(ascii(dict(request.session)))


async def delete(request: Request) -> PlainTextResponse:
    del request.session[request.path_params["key"]]
    return PlainTextResponse("deleted")


async def append(request: Request) -> JSONResponse:
    # An in-place change of a stored list must persist too.
    request.session.setdefault("items", []).append(request.path_params["value"])
    request.session["items"] = request.session["items"]  # no-op for dirty tracking
    return JSONResponse({"items": request.session["items"]})


async def append_in_place(request: Request) -> JSONResponse:
    items = request.session["items"]
    items.append(request.path_params["value"])
    return JSONResponse({"items": items})


async def login(request: Request) -> JSONResponse:
    session = get_session()
    old = session.id
    session.user_id = request.path_params["uid"]
    await session.regenerate()
    return JSONResponse({"old": old, "new": session.id})


async def logout(request: Request) -> PlainTextResponse:
    await get_session().invalidate()
    return PlainTextResponse("bye")


async def noop(request: Request) -> PlainTextResponse:
    return PlainTextResponse("nothing")


async def session_id(request: Request) -> JSONResponse:
    return JSONResponse({"id": get_session().id})


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    session = get_session()
    assert websocket.session is session
    await websocket.send_json({"data": dict(session)})
    key = await websocket.receive_text()
    session[key] = "from-websocket"
    await websocket.close()


async def ws_loop(websocket: WebSocket) -> None:
    """The usual loop: it ends when the client leaves (WebSocketDisconnect)."""
    await websocket.accept()
    session = get_session()
    while True:
        key = await websocket.receive_text()
        session[key] = "seen"
        await websocket.send_text("ok")


def routes() -> list[Any]:
    return [
        Route("/get/{key}", read),
        Route("/all", read_all),
        Route("/set/{key}/{value}", write, methods=["POST"]),
        Route("/del/{key}", delete, methods=["POST"]),
        Route("/big/{size:int}", write_big, methods=["POST"]),
        Route("/append/{value}", append, methods=["POST"]),
        Route("/append-in-place/{value}", append_in_place, methods=["POST"]),
        Route("/login/{uid}", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/noop", noop),
        Route("/id", session_id),
        WebSocketRoute("/ws", ws),
        WebSocketRoute("/ws-loop", ws_loop),
        Route("/put", put, methods=["POST"]),
        Route("/show", show),
    ]


def build(dist: Dist) -> DistMiddleware:
    async def near_cache(request: Request) -> JSONResponse:
        near = dist.sessions.near_cache
        # Not `if near`: an empty cache is falsy (len 0).
        return JSONResponse({"hits": near.hits if near is not None else 0, "pid": os.getpid()})

    return dist.wrap(Starlette(routes=[*routes(), Route("/near-cache", near_cache)]))
