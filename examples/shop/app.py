"""A flash-sale shop that uses every asgi_dist capability through FastAPI dependencies.

    python -m uvicorn examples.shop.app:app                 # embedded default, one process
    ASGI_DIST_REDIS_URL=redis://127.0.0.1:6379/0 \\
    ASGI_DIST_POSTGRES_DSN=postgresql://postgres@127.0.0.1/test \\
    ASGI_DIST_SECRET_KEYS=... python -m uvicorn examples.shop.app:app --workers 3

* sessions: login (``regenerate()``), logout (``invalidate()``), logout everywhere,
  a cart kept in the session;
* locks: ``POST /buy/{sku}`` holds the SKU's lock until the response has been sent,
  and the stock row only accepts a newer fence (``WHERE fence < $fence``);
* transactions: the stock decrement, the order and its ``order.created`` message
  commit together in the request transaction (transactional outbox);
* consumers: ``order.created`` is confirmed exactly once (inbox);
* scheduling: unpaid orders expire and return their stock, once per cluster per fire.

Without PostgreSQL (the embedded default) the same endpoints keep the shop's
tables in this process's memory, confirmations happen inline, and the lock
and the scheduler run on the memory backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from asgi_dist import Dist, DistMiddleware, get_tx
from asgi_dist.integrations.fastapi import LocksDep, SessionDep
from asgi_dist.transactions.request import RequestTransaction

dist = Dist.from_env()

SKUS: dict[str, int] = {
    sku: int(stock)
    for sku, _, stock in (
        item.partition(":")
        for item in os.environ.get("SHOP_SKUS", "sku-1:50,sku-2:50,sku-3:50").split(",")
    )
}
UNPAID_TTL = float(os.environ.get("SHOP_UNPAID_TTL", "10"))  # seconds before an order expires
EXPIRE_EVERY = float(os.environ.get("SHOP_EXPIRE_EVERY", "2"))
POSTGRES = dist.runtime.postgres is not None


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # DistMiddleware has started the Dist (and run the migrations) before this runs.
    if POSTGRES:
        assert dist.runtime.postgres is not None
        await dist.runtime.postgres.pool.executemany(
            f"INSERT INTO {table('stock')} (sku, initial, qty) VALUES ($1, $2, $2)"
            " ON CONFLICT (sku) DO NOTHING",
            list(SKUS.items()),
        )
    yield


app = FastAPI(title="asgi_dist flash-sale shop", lifespan=lifespan)


async def _tx() -> RequestTransaction | None:
    """The request transaction, or None on the embedded default (no PostgreSQL)."""
    return get_tx() if POSTGRES else None


TxDep = Annotated[RequestTransaction | None, Depends(_tx)]


class Login(BaseModel):
    user: str


# ---------------------------------------------------------------------------
# schema (PostgreSQL) and the in-memory stand-in of the embedded default

if POSTGRES:
    dist.add_migrations(
        "shop",
        [
            """
            CREATE TABLE {ns}_stock (
                sku text PRIMARY KEY, initial int NOT NULL, qty int NOT NULL,
                fence bigint NOT NULL DEFAULT 0, CHECK (qty >= 0));
            CREATE TABLE {ns}_orders (
                id uuid PRIMARY KEY, sku text NOT NULL REFERENCES {ns}_stock,
                user_id text NOT NULL, status text NOT NULL, fence bigint NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now());
            CREATE INDEX ON {ns}_orders (status, created_at);
            -- No unique constraint on purpose: the inbox alone must keep this exactly-once.
            CREATE TABLE {ns}_confirmations (
                order_id uuid NOT NULL, node text NOT NULL,
                confirmed_at timestamptz NOT NULL DEFAULT now());
            -- Likewise: the scheduler alone must run each fire once.
            CREATE TABLE {ns}_expiry_runs (
                fire_id text NOT NULL, node text NOT NULL, fence bigint NOT NULL,
                expired int NOT NULL, ran_at timestamptz NOT NULL DEFAULT now());
            """
        ],
    )


def table(name: str) -> str:
    return f"{dist.namespace}_{name}"


@dataclass
class MemoryShop:
    """The embedded default's tables: one process, guarded by the same locks."""

    stock: dict[str, int] = field(default_factory=lambda: dict(SKUS))
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    confirmations: dict[str, int] = field(default_factory=dict)


memory = MemoryShop()


# ---------------------------------------------------------------------------
# sessions


def _user(session: SessionDep) -> str:
    user = session.get("user")
    if not isinstance(user, str):
        raise HTTPException(401, 'log in first: POST /login {"user": "..."}')
    return user


@app.post("/login")
async def login(body: Login, session: SessionDep) -> dict[str, Any]:
    await session.regenerate()  # a new id on login: no session fixation
    session["user"] = body.user
    session.user_id = body.user
    return {"user": body.user}


@app.post("/logout")
async def logout(session: SessionDep) -> dict[str, Any]:
    await session.invalidate()
    return {"ok": True}


@app.post("/logout-everywhere")
async def logout_everywhere(session: SessionDep) -> dict[str, Any]:
    user = _user(session)
    await dist.sessions.invalidate_user(user)
    return {"ok": True}


@app.get("/me")
async def me(session: SessionDep) -> dict[str, Any]:
    """Read-only: no store write, and no round trip at all on a near-cached session."""
    return {
        "user": session.get("user"),
        "cart": session.get("cart", {}),
        "edits": session.get("edits", 0),
    }


@app.post("/cart/{sku}")
async def add_to_cart(sku: str, session: SessionDep) -> dict[str, Any]:
    if sku not in SKUS:
        raise HTTPException(404, f"unknown sku {sku!r}")
    cart = dict(session.get("cart", {}))
    cart[sku] = cart.get(sku, 0) + 1
    session["cart"] = cart
    session["edits"] = session.get("edits", 0) + 1
    return {"cart": cart, "edits": session["edits"]}


# ---------------------------------------------------------------------------
# the flash sale: lock + fenced update + order + outbox, in one transaction


def _sold_out(sku: str) -> JSONResponse:
    return JSONResponse({"error": f"{sku} is sold out"}, status_code=409)


@app.post("/buy/{sku}", status_code=201, response_model=None)
async def buy(
    sku: str, session: SessionDep, locks: LocksDep, tx: TxDep
) -> dict[str, Any] | JSONResponse:
    user = _user(session)
    if sku not in SKUS:
        raise HTTPException(404, f"unknown sku {sku!r}")
    # Held until the response has been sent, i.e. after the commit: the next buyer
    # reads the stock this one wrote.  A busy lock past the timeout answers 409.
    held = await locks.acquire(f"sku:{sku}", timeout=5.0)
    order_id = str(uuid.uuid4())
    if tx is None:
        if memory.stock[sku] <= 0:
            return _sold_out(sku)
        memory.stock[sku] -= 1
        memory.orders[order_id] = {"sku": sku, "user": user, "status": "pending"}
        memory.confirmations[order_id] = memory.confirmations.get(order_id, 0) + 1
        asyncio.get_running_loop().call_later(UNPAID_TTL, _expire_memory_order, order_id)
        return {"order_id": order_id, "fence": held.fence}
    # The fence rejects a writer whose lease ran out while it was paused.
    left = await tx.fetchval(
        f"UPDATE {table('stock')} SET qty = qty - 1, fence = $2"
        " WHERE sku = $1 AND qty > 0 AND fence < $2 RETURNING qty",
        sku,
        held.fence,
    )
    if left is None:
        return _sold_out(sku)
    await tx.execute(
        f"INSERT INTO {table('orders')} (id, sku, user_id, status, fence)"
        " VALUES ($1, $2, $3, 'pending', $4)",
        uuid.UUID(order_id),
        sku,
        user,
        held.fence,
    )
    await tx.publish("order.created", {"order_id": order_id, "sku": sku}, key=order_id)
    return {"order_id": order_id, "fence": held.fence, "left": left}


@app.post("/pay/{order_id}")
async def pay(order_id: str, session: SessionDep, tx: TxDep) -> Any:
    user = _user(session)
    if tx is None:
        order = memory.orders.get(order_id)
        if order is None or order["user"] != user or order["status"] != "pending":
            return JSONResponse({"error": "no pending order"}, status_code=409)
        order["status"] = "paid"
        return {"order_id": order_id, "status": "paid"}
    try:
        oid = uuid.UUID(order_id)
    except ValueError:
        raise HTTPException(404, "unknown order") from None
    paid = await tx.fetchval(
        f"UPDATE {table('orders')} SET status = 'paid'"
        " WHERE id = $1 AND user_id = $2 AND status = 'pending' RETURNING id",
        oid,
        user,
    )
    if paid is None:
        return JSONResponse({"error": "no pending order (expired or paid)"}, status_code=409)
    return {"order_id": order_id, "status": "paid"}


@app.get("/products")
async def products() -> dict[str, Any]:
    if not POSTGRES:
        return {"stock": memory.stock}
    assert dist.runtime.postgres is not None
    rows = await dist.runtime.postgres.pool.fetch(f"SELECT sku, qty FROM {table('stock')}")
    return {"stock": {r["sku"]: r["qty"] for r in rows}}


# ---------------------------------------------------------------------------
# the consumer and the cluster job

if POSTGRES and dist.runtime.redis is not None:

    @dist.consumer("order.created", group="confirmations")
    async def confirm_order(message: Any, tx: Any) -> None:
        await tx.execute(
            f"INSERT INTO {table('confirmations')} (order_id, node) VALUES ($1, $2)",
            uuid.UUID(message.payload["order_id"]),
            dist.node_id,
        )


@dist.every(seconds=EXPIRE_EVERY)
async def expire_unpaid(ctx: Any) -> None:
    """Expire unpaid orders and return their stock, once per fire across the cluster."""
    if not POSTGRES:
        return
    assert dist.runtime.postgres is not None
    async with dist.runtime.postgres.pool.acquire() as conn, conn.transaction():
        expired = await conn.fetchval(
            f"""
            WITH expired AS (
                UPDATE {table("orders")} SET status = 'expired'
                WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)
                RETURNING sku),
            returned AS (
                UPDATE {table("stock")} s SET qty = s.qty + e.n
                FROM (SELECT sku, count(*) AS n FROM expired GROUP BY sku) e
                WHERE s.sku = e.sku RETURNING e.n)
            SELECT coalesce(sum(n), 0) FROM returned
            """,
            UNPAID_TTL,
        )
        await conn.execute(
            f"INSERT INTO {table('expiry_runs')} (fire_id, node, fence, expired)"
            " VALUES ($1, $2, $3, $4)",
            ctx.fire_id,
            dist.node_id,
            ctx.fence,
            int(expired),
        )


def _expire_memory_order(order_id: str) -> None:
    order = memory.orders.get(order_id)
    if order is not None and order["status"] == "pending":
        order["status"] = "expired"
        memory.stock[order["sku"]] += 1


app.add_middleware(DistMiddleware, dist=dist)
