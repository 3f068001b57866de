"""A Quart app for the request-scope lock tests, served by hypercorn (Quart's own server)."""

from __future__ import annotations

import asyncio
import os

from quart import Quart

from asgi_dist import Dist, get_locks
from asgi_dist.integrations.quart import init_app


def create_app(dist: Dist) -> Quart:
    app = Quart(__name__)

    @app.post("/orders/<int:order_id>/pay")
    @dist.locked("order:{order_id}", timeout=0)
    async def pay(order_id: int) -> dict[str, object]:
        (held,) = get_locks().held
        await asyncio.sleep(float(os.environ.get("HOLD", "0")))
        return {"order": order_id, "fence": held.fence, "pid": os.getpid()}

    @app.post("/sku/<sku>")
    async def reserve(sku: str) -> dict[str, object]:
        held = await get_locks().acquire(f"sku:{sku}", timeout=1.0)
        await asyncio.sleep(float(os.environ.get("HOLD", "0")))
        return {"fence": held.fence}

    return init_app(app, dist)


# ``tests.locks.quart_app:app`` for hypercorn (which looks the name up in the module's
# namespace, not through a module __getattr__), configured from the environment.
app = create_app(Dist.from_env(sessions=False))
