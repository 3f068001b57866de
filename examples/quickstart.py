"""The quick start: a small Starlette app on asgi_dist.

    uvicorn examples.quickstart:app

With nothing set it runs on the embedded memory backend (one process).  Set
ASGI_DIST_REDIS_URL / ASGI_DIST_POSTGRES_DSN (and ASGI_DIST_SECRET_KEYS) to run
it on Redis and PostgreSQL across as many processes as you like.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dist import Dist

dist = Dist.from_env()


async def home(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "hello": "asgi_dist",
            "node": dist.node_id,
            "backend": dist.runtime.default_backend,
        }
    )


app = dist.wrap(Starlette(routes=[Route("/", home)]))
