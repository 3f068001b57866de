"""One tiny app per framework, each wrapped with DistMiddleware (FRAMEWORK selects it).

The Dist's start and stop are appended to EVENTS_FILE so that tests can prove
that lifespan starts and stops it exactly once per process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from asgi_dist import Dist
from asgi_dist.context import current_request

dist = Dist.from_env()
_events = Path(os.environ.get("EVENTS_FILE", os.devnull))
_start, _stop = dist.start, dist.stop


def _record(event: str) -> None:
    with _events.open("a") as f:
        f.write(f"{event} {os.getpid()}\n")


async def _recording_start() -> None:
    await _start()
    _record("start")


async def _recording_stop() -> None:
    was_started = dist.started
    await _stop()
    if was_started:
        _record("stop")


dist.start = _recording_start  # type: ignore[method-assign]
dist.stop = _recording_stop  # type: ignore[method-assign]


def _status() -> dict[str, Any]:
    return {
        "started": dist.started,
        "starts": dist.start_count,
        "path": current_request().scope["path"],
    }


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def status(request: Request) -> JSONResponse:
        return JSONResponse(_status())

    return dist.wrap(Starlette(routes=[Route("/status", status)]))


def fastapi_app() -> Any:
    from fastapi import FastAPI

    from asgi_dist import DistMiddleware

    api = FastAPI()

    @api.get("/status")
    async def status() -> dict[str, Any]:
        return _status()

    api.add_middleware(DistMiddleware, dist=dist)
    return api


def quart_app() -> Any:
    from quart import Quart

    from asgi_dist.integrations.quart import init_app

    quart = Quart(__name__)

    @quart.get("/status")
    async def status() -> dict[str, Any]:
        return _status()

    return init_app(quart, dist)


app = {"starlette": starlette_app, "fastapi": fastapi_app, "quart": quart_app}[
    os.environ.get("FRAMEWORK", "starlette")
]()
