"""The quick start: a small Starlette app on asgi_dist.

    python -m uvicorn examples.quickstart:app

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
ticks = 0


@dist.every(seconds=10)
async def heartbeat(ctx: object) -> None:
    """Runs once per fire across the whole cluster, whichever process leads."""
    global ticks
    ticks += 1


async def home(request: Request) -> JSONResponse:
    # The session lives server-side; the cookie holds only a signed random id.
    request.session["visits"] = request.session.get("visits", 0) + 1
    # One holder at a time across every process; `fence` grows with each holder.
    async with dist.lock("quickstart:greeting", ttl=5.0, timeout=2.0) as held:
        fence = held.fence
    return JSONResponse(
        {
            "hello": "asgi_dist",
            "visits": request.session["visits"],
            "fence": fence,
            "heartbeats_here": ticks,
            "node": dist.node_id,
            "backend": dist.runtime.default_backend,
        }
    )


app = dist.wrap(Starlette(routes=[Route("/", home)]))
