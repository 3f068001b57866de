"""The request transaction: begun on first use, decided before the response starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from asgi_dist import ConfigError, Dist, TransactionError, get_tx
from asgi_dist import get_session as get_session_
from asgi_dist.integrations.fastapi import TxDep
from asgi_dist.transactions import Transaction, TransactionConfig, transactional


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
    )


@pytest.fixture
async def dist(make_dist: Callable[..., Any], pg: asyncpg.Connection) -> AsyncIterator[Dist]:
    d: Dist = await make_dist()
    await pg.execute(f"CREATE TABLE {d.namespace}_orders (id int PRIMARY KEY, note text)")
    yield d


async def outbox_count(pg: asyncpg.Connection, dist: Dist) -> int:
    n: int = await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_outbox")
    return n


def starlette_app(dist: Dist) -> Any:
    orders = f"{dist.namespace}_orders"

    async def create(request: Request) -> JSONResponse:
        order_id = int(request.path_params["id"])
        tx = get_tx()
        await tx.execute(f"INSERT INTO {orders} (id) VALUES ($1)", order_id)
        await tx.publish("orders.created", {"id": order_id}, key=f"order-{order_id}")
        status = int(request.query_params.get("status", "200"))
        if request.query_params.get("raise"):
            raise RuntimeError("boom after the insert")
        return JSONResponse({"id": order_id}, status_code=status)

    @transactional(rollback_on=500)
    async def keep_on_4xx(request: Request) -> JSONResponse:
        await get_tx().execute(f"INSERT INTO {orders} (id) VALUES (77)")
        return JSONResponse({"conflict": True}, status_code=409)

    @transactional(isolation="serializable", readonly=True)
    async def report(request: Request) -> JSONResponse:
        level = await get_tx().fetchval("SHOW transaction_isolation")
        readonly = await get_tx().fetchval("SHOW transaction_read_only")
        if request.query_params.get("write"):
            await get_tx().execute(f"INSERT INTO {orders} (id) VALUES (99)")
        return JSONResponse({"isolation": level, "readonly": readonly})

    async def untouched(request: Request) -> JSONResponse:
        pool = dist.runtime.require_postgres("test").pool
        tx = get_tx()
        return JSONResponse({"state": tx.state, "in_use": pool.get_size() - pool.get_idle_size()})

    async def stream(request: Request) -> StreamingResponse:
        await get_tx().execute(f"INSERT INTO {orders} (id) VALUES (55)")

        async def body() -> AsyncIterator[bytes]:
            # The transaction committed when the response started: visible from outside.
            conn = await asyncpg.connect(request.app.state.dsn)
            try:
                n = await conn.fetchval(f"SELECT count(*) FROM {orders} WHERE id = 55")
            finally:
                await conn.close()
            yield f"seen={n}".encode()

        return StreamingResponse(body())

    async def deferred(request: Request) -> PlainTextResponse:
        tx = get_tx()
        await tx.execute(f"INSERT INTO {dist.namespace}_child (parent) VALUES (12345)")
        await tx.publish("orders.created", {"id": 12345})
        return PlainTextResponse("ok")

    async def bad_payload(request: Request) -> PlainTextResponse:
        try:
            await get_tx().publish("orders.created", {"when": object()})
        except TransactionError as exc:
            return PlainTextResponse(str(exc), status_code=422)
        return PlainTextResponse("accepted")

    app = Starlette(
        routes=[
            Route("/orders/{id}", create, methods=["POST"]),
            Route("/keep", keep_on_4xx, methods=["POST"]),
            Route("/report", report),
            Route("/untouched", untouched),
            Route("/stream", stream),
            Route("/deferred", deferred, methods=["POST"]),
            Route("/bad-payload", bad_payload, methods=["POST"]),
        ]
    )
    return dist.wrap(app)


async def test_200_means_the_row_is_committed_when_the_client_reads_it(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    async with client(starlette_app(dist)) as http:
        response = await http.post("/orders/1")
        # No waiting: the commit happened before the response started.
        row = await pg.fetchrow(f"SELECT id FROM {dist.namespace}_orders WHERE id = 1")
    assert response.status_code == 200
    assert row is not None
    assert await outbox_count(pg, dist) == 1


@pytest.mark.parametrize("query", ["status=404", "status=500", "raise=1"])
async def test_error_status_or_exception_leaves_no_row_and_no_message(
    dist: Dist, pg: asyncpg.Connection, query: str
) -> None:
    async with client(starlette_app(dist)) as http:
        response = await http.post(f"/orders/2?{query}")
    assert response.status_code >= 400
    assert await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_orders") == 0
    assert await outbox_count(pg, dist) == 0


async def test_failing_commit_answers_500_and_publishes_nothing(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    ns = dist.namespace
    await pg.execute(f"CREATE TABLE {ns}_parent (id int PRIMARY KEY)")
    # The foreign key is checked at COMMIT, after the endpoint returned 200.
    await pg.execute(
        f"CREATE TABLE {ns}_child (parent int REFERENCES {ns}_parent (id)"
        " DEFERRABLE INITIALLY DEFERRED)"
    )
    async with client(starlette_app(dist)) as http:
        response = await http.post("/deferred")
    assert response.status_code == 500
    assert "nothing was saved" in response.text
    assert await pg.fetchval(f"SELECT count(*) FROM {ns}_child") == 0
    assert await outbox_count(pg, dist) == 0


async def test_rollback_on_option_keeps_work_of_a_409(dist: Dist, pg: asyncpg.Connection) -> None:
    async with client(starlette_app(dist)) as http:
        response = await http.post("/keep")
    assert response.status_code == 409
    assert await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_orders WHERE id = 77") == 1


async def test_isolation_and_readonly_options_apply(dist: Dist, pg: asyncpg.Connection) -> None:
    async with client(starlette_app(dist)) as http:
        response = await http.get("/report")
        refused = await http.get("/report?write=1")
    assert response.json() == {"isolation": "serializable", "readonly": "on"}
    assert refused.status_code == 500
    assert await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_orders") == 0


async def test_a_request_that_never_uses_the_transaction_takes_no_connection(dist: Dist) -> None:
    pool = dist.runtime.require_postgres("test").pool
    background = pool.get_size() - pool.get_idle_size()  # the relay's LISTEN connection
    async with client(starlette_app(dist)) as http:
        response = await http.get("/untouched")
    assert response.json() == {"state": "idle", "in_use": background}


async def test_streaming_response_commits_when_it_starts(dist: Dist, postgres_dsn: str) -> None:
    app = starlette_app(dist)
    app.app.state.dsn = postgres_dsn
    async with client(app) as http:
        response = await http.get("/stream")
    assert response.text == "seen=1"


async def test_non_json_payload_and_bad_topic_are_refused_at_publish(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    async with client(starlette_app(dist)) as http:
        response = await http.post("/bad-payload")
    assert response.status_code == 422
    assert "not JSON" in response.text
    pool = dist.runtime.require_postgres("test").pool
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(ConfigError, match="topic"):
            await dist.transactions.outbox.insert(conn, "orders created!", {})
        with pytest.raises(TransactionError, match="limit"):
            await dist.transactions.outbox.insert(conn, "big", "x" * 300_000)
        # Headers are JSON too, with the same bound (DESIGN: JSON with a size bound).
        with pytest.raises(TransactionError, match="headers are 300008 bytes; the limit is 262144"):
            await dist.transactions.outbox.insert(conn, "big", {}, headers={"x": "y" * 300_000})


async def test_a_websocket_transaction_commits_when_the_connection_is_accepted(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    orders = f"{dist.namespace}_orders"

    async def ws(websocket: WebSocket) -> None:
        await get_tx().execute(f"INSERT INTO {orders} (id) VALUES (42)")
        await websocket.accept()
        await websocket.send_text(str(get_tx().state))
        await websocket.close()

    app = dist.wrap(Starlette(routes=[WebSocketRoute("/ws", ws)]))
    # Driven straight through ASGI, in this test's event loop (where the Dist lives).
    incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"",
             "headers": [], "scheme": "ws", "server": ("test", 80), "client": ("c", 1),
             "root_path": "", "subprotocols": [], "asgi": {"version": "3.0"}}  # fmt: skip
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "committed"
    assert await pg.fetchval(f"SELECT count(*) FROM {orders} WHERE id = 42") == 1


async def test_fastapi_dependency_gives_the_request_transaction(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    api = FastAPI()
    orders = f"{dist.namespace}_orders"

    @api.post("/orders/{order_id}")
    @transactional(rollback_on=500)
    async def create(order_id: int, tx: TxDep) -> dict[str, Any]:
        await tx.execute(f"INSERT INTO {orders} (id) VALUES ($1)", order_id)
        await tx.publish("orders.created", {"id": order_id})
        return {"id": order_id}

    @api.post("/fail/{order_id}")
    async def fail(order_id: int, tx: TxDep) -> dict[str, Any]:
        await tx.execute(f"INSERT INTO {orders} (id) VALUES ($1)", order_id)
        raise RuntimeError("rolled back")

    async with client(dist.wrap(api)) as http:
        ok = await http.post("/orders/5")
        failed = await http.post("/fail/6")
    assert ok.status_code == 200
    assert failed.status_code == 500
    ids = [r["id"] for r in await pg.fetch(f"SELECT id FROM {orders} ORDER BY id")]
    assert ids == [5]
    assert await outbox_count(pg, dist) == 1


async def test_quart_views_get_the_transaction_and_their_options(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    from quart import Quart

    from asgi_dist.integrations.quart import init_app

    quart = Quart(__name__)
    orders = f"{dist.namespace}_orders"

    @quart.post("/keep/<int:order_id>")
    @transactional(rollback_on=500)
    async def keep(order_id: int) -> tuple[str, int]:
        await get_tx().execute(f"INSERT INTO {orders} (id) VALUES ($1)", order_id)
        return "conflict, but keep it", 409

    @quart.post("/drop/<int:order_id>")
    async def drop(order_id: int) -> tuple[str, int]:
        await get_tx().execute(f"INSERT INTO {orders} (id) VALUES ($1)", order_id)
        return "conflict", 409

    async with client(init_app(quart, dist)) as http:
        kept = await http.post("/keep/1")
        dropped = await http.post("/drop/2")
    assert (kept.status_code, dropped.status_code) == (409, 409)
    assert [r["id"] for r in await pg.fetch(f"SELECT id FROM {orders}")] == [1]


def session_state_app(dist: Dist, seen: dict[str, Any]) -> Any:
    """An endpoint that changes its connection's session state, then answers 200."""
    orders = f"{dist.namespace}_orders"

    async def dirty(request: Request) -> PlainTextResponse:
        tx = get_tx()
        await tx.execute(f"INSERT INTO {orders} (id) VALUES (1)")
        seen["pid"] = await tx.fetchval("SELECT pg_backend_pid()")
        await tx.execute("SET application_name = 'left-behind'")
        await tx.execute("SELECT pg_advisory_lock(4242)")
        await tx.execute("LISTEN left_behind")
        # What reaches the server from here to the release (reset included).
        tx.connection.add_query_logger(lambda q: seen["after"].append(q.query))
        return PlainTextResponse("ok", status_code=int(request.query_params.get("status", 200)))

    seen["after"] = []
    return dist.wrap(Starlette(routes=[Route("/dirty", dirty, methods=["POST"])]))


@pytest.mark.parametrize(("status", "ending"), [(200, "COMMIT;"), (409, "ROLLBACK;")])
async def test_the_end_and_the_reset_share_one_round_trip_and_leave_no_session_state(
    dist: Dist, pg: asyncpg.Connection, status: int, ending: str
) -> None:
    seen: dict[str, Any] = {}
    async with client(session_state_app(dist, seen)) as http:
        response = await http.post(f"/dirty?status={status}")
    assert response.status_code == status
    saved = await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_orders")
    assert saved == (1 if status == 200 else 0)
    # A hand-written transaction sends COMMIT, then the pool sends its reset query:
    # here both travel in one message, and the pool sends nothing more.
    assert len(seen["after"]) == 1, seen["after"]
    ended = seen["after"][0]
    assert ending in ended and "RESET ALL;" in ended and "UNLISTEN *;" in ended
    # The next user of that connection finds it as the pool's reset leaves it. Seen
    # from another session: the pool may hand out another of its connections first.
    activity = "SELECT application_name FROM pg_stat_activity WHERE pid = $1"
    assert await pg.fetchval(activity, seen["pid"]) != "left-behind"
    locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1"
    assert await pg.fetchval(locks, seen["pid"]) == 0


async def test_a_pool_passed_in_keeps_its_own_reset_and_still_commits(
    make_dist: Callable[..., Any], postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
    try:
        dist: Dist = await make_dist(postgres=pool, sessions=False)
        await pg.execute(f"CREATE TABLE {dist.namespace}_orders (id int PRIMARY KEY)")
        seen: dict[str, Any] = {}
        async with client(session_state_app(dist, seen)) as http:
            response = await http.post("/dirty")
        assert response.status_code == 200
        assert seen["after"][0] == "COMMIT;"  # asyncpg's commit, then its pool's reset
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW application_name") != "left-behind"
        assert await pg.fetchval(f"SELECT count(*) FROM {dist.namespace}_orders") == 1
    finally:
        await dist.stop()
        await pool.close()


@pytest.mark.parametrize("pool_passed_in", [False, True])
async def test_work_lost_to_a_caught_error_answers_500_not_200(
    make_dist: Callable[..., Any], postgres_dsn: str, pg: asyncpg.Connection, pool_passed_in: bool
) -> None:
    pool = (
        await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2) if pool_passed_in else None
    )
    try:
        dist: Dist = await make_dist(postgres=pool or postgres_dsn, sessions=False)
        orders = f"{dist.namespace}_orders"
        await pg.execute(f"CREATE TABLE {orders} (id int PRIMARY KEY)")

        async def swallow(request: Request) -> PlainTextResponse:
            tx = get_tx()
            await tx.execute(f"INSERT INTO {orders} (id) VALUES (3)")
            with pytest.raises(asyncpg.DataError):
                await tx.execute("SELECT 1 / $1::int", 0)
            # PostgreSQL answers a COMMIT of this aborted transaction with ROLLBACK.
            return PlainTextResponse("looks fine")

        app = dist.wrap(Starlette(routes=[Route("/swallow", swallow, methods=["POST"])]))
        async with client(app) as http:
            response = await http.post("/swallow")
            again = await http.post("/swallow")  # its connection went back clean
        assert (response.status_code, again.status_code) == (500, 500)
        assert "nothing was saved" in response.text
        assert await pg.fetchval(f"SELECT count(*) FROM {orders}") == 0
    finally:
        if pool is not None:
            await dist.stop()
            await pool.close()


async def test_conn_transaction_inside_the_request_nests_as_a_savepoint(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    orders = f"{dist.namespace}_orders"

    async def nested(request: Request) -> PlainTextResponse:
        tx = get_tx()
        await tx.execute(f"INSERT INTO {orders} (id) VALUES (1)")
        with pytest.raises(RuntimeError):
            async with tx.connection.transaction():
                await tx.execute(f"INSERT INTO {orders} (id) VALUES (2)")
                raise RuntimeError("undo the savepoint only")
        async with tx.connection.transaction():
            await tx.execute(f"INSERT INTO {orders} (id) VALUES (3)")
        return PlainTextResponse("ok")

    app = dist.wrap(Starlette(routes=[Route("/nested", nested, methods=["POST"])]))
    async with client(app) as http:
        response = await http.post("/nested")
    assert response.status_code == 200
    assert [r["id"] for r in await pg.fetch(f"SELECT id FROM {orders} ORDER BY id")] == [1, 3]


async def test_two_tasks_of_one_request_share_one_begin(dist: Dist, pg: asyncpg.Connection) -> None:
    orders = f"{dist.namespace}_orders"

    async def both(request: Request) -> PlainTextResponse:
        tx = get_tx()
        first, second = await asyncio.gather(tx.begin(), tx.begin())
        assert first is second
        await tx.execute(f"INSERT INTO {orders} (id) VALUES (8)")
        return PlainTextResponse(tx.state)

    app = dist.wrap(Starlette(routes=[Route("/both", both, methods=["POST"])]))
    async with client(app) as http:
        response = await http.post("/both")
    assert (response.status_code, response.text) == (200, "open")
    assert await pg.fetchval(f"SELECT count(*) FROM {orders} WHERE id = 8") == 1


async def test_a_request_waits_for_a_busy_pool_at_most_acquire_timeout_then_answers_503(
    make_dist: Callable[..., Any],
) -> None:
    dist: Dist = await make_dist(
        sessions=False, transactions=TransactionConfig(acquire_timeout=0.3)
    )
    pool = dist.runtime.require_postgres("test").pool
    held = []
    try:
        with contextlib.suppress(TimeoutError):
            for _ in range(pool.get_max_size()):
                held.append(await pool.acquire(timeout=0.5))

        async def query(request: Request) -> PlainTextResponse:
            await get_tx().execute("SELECT 1")
            return PlainTextResponse("ok")

        app = dist.wrap(Starlette(routes=[Route("/q", query)]))
        async with client(app) as http:
            busy = await http.get("/q")  # after acquire_timeout, not never
            await pool.release(held.pop())
            free = await http.get("/q")
    finally:
        for conn in held:
            await pool.release(conn)
    assert busy.status_code == 503 and "retry-after" in busy.headers
    assert free.status_code == 200


async def test_a_cancelled_request_rolls_back_and_returns_its_connection(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    orders = f"{dist.namespace}_orders"
    held: list[asyncpg.Connection] = []

    async def slow(request: Request) -> PlainTextResponse:
        await get_tx().execute(f"INSERT INTO {orders} (id) VALUES (9)")
        held.append(get_tx().connection)
        await asyncio.sleep(30)  # the client goes away meanwhile
        return PlainTextResponse("never")

    app = dist.wrap(Starlette(routes=[Route("/slow", slow)]))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/slow", "raw_path": b"/slow",
             "query_string": b"", "root_path": "", "headers": [], "client": ("c", 1),
             "server": ("test", 80)}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    request = asyncio.ensure_future(app(scope, receive, send))
    for _ in range(100):
        if held:
            break
        await asyncio.sleep(0.05)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    # The pool got the connection back (its proxy is detached), without the row.
    for _ in range(100):  # the shielded close may still be on its way
        try:
            await held[0].fetchval("SELECT 1")
        except asyncpg.InterfaceError as exc:  # or "another operation is in progress"
            if "released back to the pool" in str(exc):
                break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the cancelled request kept its connection")
    assert await pg.fetchval(f"SELECT count(*) FROM {orders}") == 0


@pytest.mark.parametrize("change", ["not JSON", "over max_size"])
async def test_a_session_that_cannot_be_stored_fails_the_request_before_the_commit(
    dist: Dist, pg: asyncpg.Connection, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The session is encoded and size-checked before the request transaction
    commits: a 500 never hides a committed write (a retry would do it twice)."""
    orders = f"{dist.namespace}_orders"

    async def setup(request: Request) -> JSONResponse:
        get_session_()["items"] = []
        get_session_()["kept"] = "before"
        return JSONResponse({})

    async def order(request: Request) -> JSONResponse:
        await get_tx().execute(f"INSERT INTO {orders} (id) VALUES (5)")
        session = get_session_()
        session["kept"] = "changed by the failed request"
        # Changed in place: only the save can see it.
        session["items"].append({1, 2} if change == "not JSON" else "x" * 70_000)
        return JSONResponse({"ordered": 5}, status_code=201)

    async def show(request: Request) -> JSONResponse:
        return JSONResponse(dict(get_session_()))

    app = dist.wrap(
        Starlette(routes=[Route("/setup", setup), Route("/order", order), Route("/show", show)])
    )
    async with client(app) as http:
        await http.get("/setup")
        answer = await http.get("/order")
        shown = (await http.get("/show")).json()
    assert answer.status_code == 500
    assert await pg.fetchval(f"SELECT count(*) FROM {orders}") == 0, "the insert was committed"
    assert shown == {"items": [], "kept": "before"}
    assert "session['items']" in caplog.text


@pytest.mark.parametrize("used_before", [False, True])
async def test_get_tx_in_a_background_task_raises_instead_of_losing_the_work(
    dist: Dist, pg: asyncpg.Connection, used_before: bool
) -> None:
    from starlette.background import BackgroundTask

    orders = f"{dist.namespace}_orders"
    errors: list[Exception] = []

    async def later() -> None:
        try:
            await get_tx().execute(f"INSERT INTO {orders} (id) VALUES (2)")
        except TransactionError as exc:
            errors.append(exc)

    async def endpoint(request: Request) -> PlainTextResponse:
        if used_before:
            await get_tx().execute(f"INSERT INTO {orders} (id) VALUES (1)")
        return PlainTextResponse("ok", background=BackgroundTask(later))

    app = dist.wrap(Starlette(routes=[Route("/later", endpoint, methods=["POST"])]))
    async with client(app) as http:
        response = await http.post("/later")  # the ASGI transport runs the background task
    assert response.status_code == 200
    assert len(errors) == 1
    assert "before returning the response" in str(errors[0])
    assert "open a transaction of your own" in str(errors[0])
    saved = [r["id"] for r in await pg.fetch(f"SELECT id FROM {orders}")]
    assert saved == ([1] if used_before else [])


@pytest.mark.parametrize(
    ("ending", "saved"), [("close", True), ("client disconnect", True), ("raise", False)]
)
async def test_a_websocket_commits_its_work_after_the_accept_unless_it_fails(
    dist: Dist, pg: asyncpg.Connection, ending: str, saved: bool
) -> None:
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    orders = f"{dist.namespace}_orders"
    held: list[asyncpg.Connection] = []

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await get_tx().execute(f"INSERT INTO {orders} (id) VALUES (43)")
        held.append(get_tx().connection)
        if ending == "raise":
            raise RuntimeError("the websocket failed")
        if ending == "client disconnect":
            await websocket.receive_text()  # raises WebSocketDisconnect
        await websocket.close()

    app = dist.wrap(Starlette(routes=[WebSocketRoute("/ws", ws)]))
    incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1001}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"",
             "headers": [], "scheme": "ws", "server": ("test", 80), "client": ("c", 1),
             "root_path": "", "subprotocols": [], "asgi": {"version": "3.0"}}  # fmt: skip
    with contextlib.suppress(Exception):
        await app(scope, receive, send)
    assert await pg.fetchval(f"SELECT count(*) FROM {orders} WHERE id = 43") == int(saved)
    with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
        await held[0].fetchval("SELECT 1")


async def test_an_explicit_commit_after_a_caught_error_raises(
    dist: Dist, pg: asyncpg.Connection
) -> None:
    orders = f"{dist.namespace}_orders"

    async def swallow(request: Request) -> PlainTextResponse:
        tx = get_tx()
        await tx.execute(f"INSERT INTO {orders} (id) VALUES (4)")
        with contextlib.suppress(asyncpg.DataError):
            await tx.execute("SELECT 1 / $1::int", 0)
        try:
            await tx.commit()
        except TransactionError as exc:
            return PlainTextResponse(str(exc), status_code=409)
        return PlainTextResponse("committed")

    app = dist.wrap(Starlette(routes=[Route("/swallow", swallow, methods=["POST"])]))
    async with client(app) as http:
        response = await http.post("/swallow")
    assert response.status_code == 409
    assert "refused to commit" in response.text and "DivisionByZeroError" in response.text
    assert await pg.fetchval(f"SELECT count(*) FROM {orders}") == 0


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"payload": {"name": "\ud800"}}, "lone surrogate"),
        ({"key": "order-\x00"}, "NUL"),
        ({"key": "order-\udcff"}, "lone surrogate"),
        ({"headers": {"trace": "\ud800"}}, "lone surrogate"),
    ],
)
async def test_text_postgresql_cannot_store_is_refused_before_any_round_trip(
    dist: Dist, bad: dict[str, Any], named: str
) -> None:
    pool = dist.runtime.require_postgres("test").pool
    async with pool.acquire() as conn, conn.transaction():
        tx = Transaction(dist.transactions.outbox, conn)
        kwargs = {"payload": {}, **bad}
        with pytest.raises(TransactionError, match=named):
            await tx.publish("orders.created", **kwargs)
        # Refused before the server saw it: the caller's transaction is still usable.
        assert await conn.fetchval("SELECT 1") == 1
