"""The app the uvicorn tests run, in Starlette, FastAPI or Quart (FRAMEWORK selects it).

``POST /orders/<id>`` inserts an order and publishes ``orders.created`` in the request
transaction; ``?fail=1`` answers 500 after doing the same (both must vanish).  Every
process also relays the outbox and consumes ``orders.created`` in group ``mailer``,
recording one effect row per handled message.
"""

from __future__ import annotations

import os
from typing import Any

from asgi_dist import Dist, get_tx
from asgi_dist.transactions import Message, Transaction
from tests.transactions.settings import FAST

dist = Dist.from_env(sessions=False, transactions=FAST)
NS = dist.namespace


@dist.consumer("orders.created", group="mailer", concurrency=4)
async def send_mail(message: Message, tx: Transaction) -> None:
    await tx.execute(
        f"INSERT INTO {NS}_effects (msg_id, key, n, pid) VALUES ($1, $2, $3, $4)",
        message.id,
        message.key,
        message.payload["id"],
        os.getpid(),
    )


async def create_order(order_id: int) -> None:
    tx = get_tx()
    await tx.execute(f"INSERT INTO {NS}_orders (id, pid) VALUES ($1, $2)", order_id, os.getpid())
    await tx.publish("orders.created", {"id": order_id}, key=f"order-{order_id}")


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def orders(request: Request) -> JSONResponse:
        await create_order(int(request.path_params["id"]))
        status = 500 if request.query_params.get("fail") else 201
        return JSONResponse({"pid": os.getpid()}, status_code=status)

    return dist.wrap(Starlette(routes=[Route("/orders/{id}", orders, methods=["POST"])]))


def fastapi_app() -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from asgi_dist import DistMiddleware

    api = FastAPI()

    @api.post("/orders/{order_id}")
    async def orders(order_id: int, fail: int = 0) -> JSONResponse:
        await create_order(order_id)
        return JSONResponse({"pid": os.getpid()}, status_code=500 if fail else 201)

    api.add_middleware(DistMiddleware, dist=dist)
    return api


def quart_app() -> Any:
    from quart import Quart, request

    from asgi_dist.integrations.quart import init_app

    quart = Quart(__name__)

    @quart.post("/orders/<int:order_id>")
    async def orders(order_id: int) -> tuple[dict[str, int], int]:
        await create_order(order_id)
        return {"pid": os.getpid()}, 500 if request.args.get("fail") else 201

    return init_app(quart, dist)


app = {"starlette": starlette_app, "fastapi": fastapi_app, "quart": quart_app}[
    os.environ.get("FRAMEWORK", "starlette")
]()
