"""The app that ``bench_sessions.py`` serves, once per session layer (BENCH_KIND).

Endpoints: ``POST /init`` creates the session (sets ``k``), ``GET /read`` reads ``k``
(read-only), ``POST /write`` reads ``k`` and writes ``n`` (modify).

BENCH_KIND: bare | starlette | starsessions | asgi_dist_redis | asgi_dist_near | asgi_dist_pg
BENCH_REDIS_URL, BENCH_POSTGRES_DSN, BENCH_NAMESPACE configure the stores.
"""

from __future__ import annotations

import os
import random
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

KIND = os.environ.get("BENCH_KIND", "bare")
SECRET = "bench-secret-key-0123456789abcdef"


def _session(request: Request) -> Any:
    # The bare app has no session layer: a dict stands in.
    return request.scope.get("session", {})


async def init(request: Request) -> PlainTextResponse:
    _session(request)["k"] = "value"
    return PlainTextResponse("ok")


async def read(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(_session(request).get("k")))


async def write(request: Request) -> PlainTextResponse:
    session = _session(request)
    session["n"] = random.randrange(1 << 30)
    return PlainTextResponse(str(session.get("k")))


def endpoints() -> Starlette:
    return Starlette(
        routes=[
            Route("/init", init, methods=["POST"]),
            Route("/read", read),
            Route("/write", write, methods=["POST"]),
        ]
    )


def build(kind: str = KIND) -> Any:
    inner = endpoints()
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    if kind == "bare":
        return inner
    if kind == "starlette":
        from starlette.middleware.sessions import SessionMiddleware

        return SessionMiddleware(inner, secret_key=SECRET)
    if kind == "starsessions":
        from redis.asyncio import Redis
        from starsessions import SessionAutoloadMiddleware, SessionMiddleware
        from starsessions.stores.redis import RedisStore

        store = RedisStore(connection=Redis.from_url(redis_url))
        autoload = SessionAutoloadMiddleware(inner)
        return SessionMiddleware(autoload, store=store, cookie_https_only=False, lifetime=3600)
    from asgi_dist import Dist
    from asgi_dist.scheduling import SchedulerConfig
    from asgi_dist.sessions import SessionConfig

    namespace = os.environ.get("BENCH_NAMESPACE", "bench")
    common: dict[str, Any] = {
        "namespace": namespace,
        "secret_keys": [SECRET],
        "scheduler": SchedulerConfig(enabled=False),
    }
    if kind == "asgi_dist_pg":
        dist = Dist(None, os.environ["BENCH_POSTGRES_DSN"], **common)
    else:
        near = kind == "asgi_dist_near"
        dist = Dist(redis_url, sessions=SessionConfig(near_cache=near), **common)
    return dist.wrap(inner)


app = build()
