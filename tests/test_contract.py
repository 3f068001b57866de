"""The public contract of DESIGN.md, exercised once end to end on Redis + PostgreSQL.

Each capability proves its behaviour in depth under tests/<capability>/; this file
proves that the names and shapes users (and outside acceptance checks) write
against exist and work together in one app.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asgi_dist
from asgi_dist import (
    Dist,
    DistMiddleware,
    LockTimeout,
    get_locks,
    get_session,
    get_tx,
)

ERRORS = [
    "DistError",
    "ConfigError",
    "BackendUnavailable",
    "LockError",
    "LockTimeout",
    "LockLost",
    "LockNotOwned",
    "SessionError",
    "SessionTooLarge",
    "TransactionError",
    "SchedulerError",
]


def test_every_error_is_importable_from_the_package_and_forms_one_tree() -> None:
    for name in ERRORS:
        cls = getattr(asgi_dist, name)
        assert issubclass(cls, asgi_dist.DistError)
        assert name in asgi_dist.__all__
    assert issubclass(asgi_dist.LockTimeout, asgi_dist.LockError)
    assert issubclass(asgi_dist.SessionTooLarge, asgi_dist.SessionError)


async def _eventually(predicate: Any, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_contract_end_to_end(make_dist: Any, namespace: str) -> None:
    dist: Dist = await make_dist(start=False, leader_ttl=2.0)
    consumed: list[Any] = []
    ran: list[Any] = []

    @dist.consumer("orders.created", group="mailer")
    async def on_created(message: Any, tx: Any) -> None:
        await tx.execute(f"INSERT INTO {namespace}_mails (order_id) VALUES ($1)", message.key)
        consumed.append(message)

    @dist.every(seconds=1)
    async def heartbeat(ctx: Any) -> None:
        ran.append((ctx.job, ctx.fire_id, ctx.fence, ctx.attempt, ctx.node_id, ctx.fire_time))

    dist.add_migrations("contract", ["CREATE TABLE {ns}_mails (order_id text NOT NULL)"])

    async def order(request: Request) -> JSONResponse:
        session = get_session()
        assert session is request.session  # request.session and get_session() agree
        session["orders"] = session.get("orders", 0) + 1
        held = await get_locks().acquire("order:7", timeout=1.0)
        tx = get_tx()
        await tx.execute("SELECT 1")
        await tx.publish("orders.created", {"id": 7}, key="order-7")
        return JSONResponse({"fence": held.fence, "orders": session["orders"], "id": session.id})

    app = Starlette(routes=[Route("/order", order, methods=["POST"])])
    app.add_middleware(DistMiddleware, dist=dist)
    async with dist:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://shop.test") as client:
            first = await client.post("/order")
            second = await client.post("/order")
        assert first.status_code == 200 and second.status_code == 200
        assert second.json()["orders"] == 2 and first.json()["id"] == second.json()["id"]
        assert first.json()["fence"] < second.json()["fence"]
        cookie = first.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "secure" in cookie
        assert "cookie" in first.headers["vary"].lower()

        # The request's lock was released when its response ended.
        async with dist.lock("order:7", ttl=30.0, timeout=5.0) as held:
            assert held.fence > second.json()["fence"]
            assert not held.lost.is_set()
            with pytest.raises(LockTimeout):
                await dist.lock("order:7").acquire(timeout=0)
        handle = await dist.lock("sku:42").acquire(timeout=5.0)
        await handle.extend(30.0)
        await handle.release()

        async with dist.election("contract").leadership() as term:
            assert term.fence >= 1 and not term.lost.is_set()

        # The outbox reached the consumer: message shape and exactly-once effects.
        async def two_consumed() -> bool:
            return len(consumed) >= 2

        await _eventually(two_consumed)
        message = consumed[0]
        assert (message.topic, message.key, message.payload) == (
            "orders.created",
            "order-7",
            {"id": 7},
        )
        assert message.id and message.attempt == 1 and isinstance(message.headers, dict)
        assert consumed[0].id != consumed[1].id
        assert dist.runtime.postgres is not None
        mails = await dist.runtime.postgres.fetchval(f"SELECT count(*) FROM {namespace}_mails")
        assert mails == 2

        async def heartbeat_ran() -> bool:
            return len(ran) >= 1

        await _eventually(heartbeat_ran)
        job, fire_id, fence, attempt, node_id, _ = ran[0]
        assert (job, attempt, node_id) == ("heartbeat", 1, dist.node_id)
        assert fire_id.startswith("heartbeat:") and fence >= 1
        await dist.scheduler.pause("heartbeat")
        await dist.scheduler.resume("heartbeat")
        await dist.scheduler.trigger("heartbeat")
        history = await dist.scheduler.history("heartbeat", limit=20)
        assert history and {"fire_id", "status", "node", "fence", "attempt"} <= set(history[0])

        assert await dist.sessions.list_user("nobody") == []
        assert await dist.sessions.invalidate_user("nobody") == 0
