"""A FastAPI app for the request-scope tests, run in-process and under uvicorn."""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI

from asgi_dist import Dist, DistMiddleware, get_locks


def create_app(dist: Dist) -> DistMiddleware:
    app = FastAPI()

    @app.post("/orders/{order_id}/pay")
    @dist.locked("order:{order_id}", timeout=0)
    async def pay(order_id: int, hold: float = 0.0) -> dict[str, object]:
        (held,) = get_locks().held
        await asyncio.sleep(hold)
        return {"order": order_id, "fence": held.fence, "pid": os.getpid()}

    @app.post("/carts/{cart}/checkout")
    @dist.locked("cart:{cart}", timeout=0)
    async def checkout(cart: str) -> dict[str, object]:
        (held,) = get_locks().held
        return {"lock": held.name, "fence": held.fence}

    @app.post("/sku/{sku}")
    async def reserve(sku: str, fail: bool = False) -> dict[str, object]:
        held = await get_locks().acquire(f"sku:{sku}", timeout=1.0)
        if fail:
            raise RuntimeError("the endpoint failed after taking the lock")
        return {"fence": held.fence}

    return dist.wrap(app)


def __getattr__(name: str) -> DistMiddleware:
    # ``tests.locks.app:app`` for uvicorn, configured from the environment.
    if name == "app":
        return create_app(Dist.from_env(sessions=False))
    raise AttributeError(name)
