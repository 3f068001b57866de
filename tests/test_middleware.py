"""DistMiddleware: lifespan, request context, and the status codes of our errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from asgi_dist import (
    BackendUnavailable,
    ConfigError,
    Dist,
    DistMiddleware,
    LockLost,
    LockTimeout,
    NoRequestContext,
    TransactionError,
    get_locks,
    get_session,
    get_tx,
    middleware,
)
from asgi_dist._types import Message, Receive, Scope, Send
from asgi_dist.context import RequestContext, current_request
from asgi_dist.scheduling import SchedulerConfig
from asgi_dist.sessions import SessionConfig
from tests.helpers.asgi import Lifespan
from tests.helpers.servers import RedisServer


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_lifespan_starts_dist_before_app_startup_and_stops_after_shutdown() -> None:
    dist = Dist()
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        events.append(f"app startup, dist started={dist.started}")
        yield {"answer": 42}
        events.append(f"app shutdown, dist started={dist.started}")

    async def home(request: Request) -> JSONResponse:
        return JSONResponse({"answer": request.state.answer})

    app = dist.wrap(Starlette(routes=[Route("/", home)], lifespan=lifespan))
    async with Lifespan(app) as lifespan_driver:
        assert dist.started
        scope_state = lifespan_driver.state
        assert scope_state == {"answer": 42}  # Starlette's lifespan state still works
    assert not dist.started
    assert events == ["app startup, dist started=True", "app shutdown, dist started=True"]
    assert dist.start_count == 1


async def test_lifespan_works_when_the_inner_app_does_not_speak_lifespan() -> None:
    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http", "this app knows only http"
        await PlainTextResponse("ok")(scope, receive, send)

    dist = Dist()
    async with Lifespan(dist.wrap(bare)):
        assert dist.started
    assert not dist.started
    assert dist.start_count == 1


async def test_lifespan_reports_start_failure_with_the_message() -> None:
    dist = Dist(redis="redis://:hunter2@127.0.0.1:1/0", secret_keys=["k" * 32], connect_timeout=2)
    driver = Lifespan(dist.wrap(Starlette()))
    message = await driver.startup()
    assert message["type"] == "lifespan.startup.failed"
    assert "127.0.0.1:1" in message["message"]
    assert "hunter2" not in message["message"]
    assert not dist.started


def test_a_dist_that_cannot_start_fails_starlettes_test_client_instead_of_hanging() -> None:
    # Unreachable Redis: start() fails.  TestClient waits for the app to raise
    # after lifespan.startup.failed, as Starlette's own router does.
    dist = Dist(redis="redis://127.0.0.1:1/0", secret_keys=["k" * 32], connect_timeout=1)
    app = dist.wrap(Starlette())
    outcome: list[BaseException | None] = []

    def enter() -> None:
        try:
            with TestClient(app):
                outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=enter, daemon=True)
    worker.start()
    worker.join(30)
    assert outcome, "TestClient hung on a failed startup"
    assert isinstance(outcome[0], BackendUnavailable), outcome
    assert "127.0.0.1:1" in str(outcome[0])
    assert not dist.started


async def test_inner_startup_failure_stops_the_dist() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("the app's own startup broke")
        yield

    dist = Dist()
    driver = Lifespan(dist.wrap(Starlette(lifespan=lifespan)))
    message = await driver.startup()
    assert message["type"] == "lifespan.startup.failed"
    assert "the app's own startup broke" in message["message"]
    assert not dist.started


async def test_a_starlette_app_that_breaks_before_answering_startup_fails_the_startup() -> None:
    class Broken:
        def __init__(self, app: Any) -> None:
            raise RuntimeError("this middleware cannot be built")

    # Starlette builds its middleware stack on the first call, the lifespan: the
    # error comes before the app could answer the startup.
    dist = Dist()
    driver = Lifespan(dist.wrap(Starlette(middleware=[Middleware(Broken)])))
    message = await driver.startup()
    assert message["type"] == "lifespan.startup.failed"
    assert "cannot be built" in message["message"]
    assert not dist.started
    assert driver._task is not None
    with pytest.raises(RuntimeError, match="cannot be built"):
        await driver._task  # raised too, as servers expect


async def test_the_wrap_form_answers_a_postgres_outage_met_in_a_view_with_503() -> None:
    import asyncpg

    async def view(request: Request) -> PlainTextResponse:
        # The view's own driver call, to a server that is not there.
        await asyncpg.connect("postgresql://postgres@127.0.0.1:1/test", timeout=2)
        return PlainTextResponse("unreachable")

    dist = Dist()
    app = dist.wrap(Starlette(routes=[Route("/", view)]))
    async with Lifespan(app), _client(app) as client:
        response = await client.get("/")
    assert response.status_code == 503
    assert "Retry-After" in response.headers


async def test_request_context_is_set_inside_a_request_and_gone_outside() -> None:
    seen: list[RequestContext] = []

    async def home(request: Request) -> PlainTextResponse:
        seen.append(current_request())
        return PlainTextResponse("ok")

    dist = Dist()
    async with dist, _client(dist.wrap(Starlette(routes=[Route("/", home)]))) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert seen[0].scope["path"] == "/"
    for accessor in (get_session, get_locks, get_tx):
        with pytest.raises(NoRequestContext, match="outside a request"):
            accessor()


def test_request_context_is_set_inside_a_websocket() -> None:
    paths: list[str] = []

    async def ws(websocket: WebSocket) -> None:
        paths.append(current_request().scope["path"])
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    dist = Dist()
    app = dist.wrap(Starlette(routes=[WebSocketRoute("/ws", ws)]))
    with TestClient(app) as client, client.websocket_connect("/ws") as socket:
        assert socket.receive_text() == "hi"
    assert paths == ["/ws"]


def _raising_app(exc: Exception) -> Starlette:
    async def boom(request: Request) -> PlainTextResponse:
        raise exc

    return Starlette(routes=[Route("/", boom)])


@pytest.mark.parametrize("style", ["wrap", "add_middleware", "pure_asgi"])
@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (BackendUnavailable("Redis at 127.0.0.1:6379 is unavailable", retry_after=2), 503),
        (LockTimeout("lock 'sku:1' is busy", name="sku:1", retry_after=3), 409),
        (LockLost("lock 'sku:1' was taken over during the request"), 409),
        (LockLost("no renewal succeeded for 10s", outage=True), 503),
    ],
)
async def test_errors_become_503_and_409_with_retry_after(
    style: str, exc: Exception, status: int
) -> None:
    dist = Dist()
    app: Any
    if style == "wrap":
        app = dist.wrap(_raising_app(exc))
    elif style == "add_middleware":
        app = _raising_app(exc)
        app.add_middleware(DistMiddleware, dist=dist)
    else:

        async def pure(scope: Scope, receive: Receive, send: Send) -> None:
            raise exc

        app = DistMiddleware(pure, dist=dist)
    async with dist, _client(app) as client:
        response = await client.get("/")
    assert response.status_code == status
    assert int(response.headers["retry-after"]) >= 1
    assert "127.0.0.1" not in response.text  # the body names the cause, not our servers
    assert response.text.startswith(("Service Unavailable", "Conflict"))


async def test_a_hook_failing_before_the_response_replaces_the_success() -> None:
    class FailingCommit:
        async def on_request(self, ctx: RequestContext) -> None:
            return None

        def check_response(self, ctx: RequestContext) -> None:
            return None

        async def on_response_start(self, ctx: RequestContext, message: Message) -> None:
            raise TransactionError("commit failed: serialization failure")

        async def on_response_end(self, ctx: RequestContext) -> None:
            return None

        async def on_finish(self, ctx: RequestContext, error: BaseException | None) -> None:
            return None

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("order placed")

    dist = Dist()
    dist.request_hooks = lambda: [FailingCommit()]  # type: ignore[method-assign]
    async with dist, _client(dist.wrap(Starlette(routes=[Route("/", home)]))) as client:
        response = await client.get("/")
    assert response.status_code == 500
    assert "order placed" not in response.text
    assert "commit failed" in response.text


def test_wrapping_something_that_is_not_an_app_is_refused() -> None:
    with pytest.raises(ConfigError, match="DistMiddleware needs an ASGI app, got None"):
        Dist().wrap(None)  # type: ignore[arg-type]


def test_app_add_middleware_form_runs_lifespan_once() -> None:
    dist = Dist()
    app = Starlette(middleware=[Middleware(DistMiddleware, dist=dist)])
    with TestClient(app):
        assert dist.started
    assert dist.start_count == 1
    assert not dist.started


async def test_a_request_whose_lock_is_taken_over_is_cancelled_and_answers_409(
    make_dist: Any, redis_client: Any
) -> None:
    dist: Dist = await make_dist()
    reached_end: list[bool] = []

    async def slow(request: Request) -> PlainTextResponse:
        # A short ttl so that the watchdog's renewal (every ttl/3) comes quickly.
        await get_locks().acquire("order:1", timeout=1.0, ttl=1.5)
        # Someone else takes the lock over (as after a pause past the lease).
        keys = await redis_client.keys(f"{{{dist.namespace}:lock:order:1}}*")
        await redis_client.delete(*keys)
        await asyncio.sleep(10)  # the watchdog's next renewal finds the lease gone
        reached_end.append(True)
        return PlainTextResponse("done")

    async with _client(dist.wrap(Starlette(routes=[Route("/", slow)]))) as client:
        response = await asyncio.wait_for(client.get("/"), 15)
    assert response.status_code == 409
    assert response.headers["retry-after"] == "1"
    assert "was lost during the request" in response.text
    assert reached_end == []


@pytest.mark.parametrize("dist", [None, "redis://127.0.0.1:6379", Dist])
def test_middleware_given_something_that_is_not_a_dist_says_what_to_pass(dist: object) -> None:
    with pytest.raises(ConfigError, match=r"DistMiddleware needs dist=Dist\(\.\.\.\)"):
        DistMiddleware(Starlette(), dist=dist)  # type: ignore[arg-type]


async def test_an_outage_logs_its_first_503_with_the_cause_then_summaries_then_its_end(
    make_dist: Any,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line per 503 floods the log during an outage: the first is logged with its
    cause, the rest are counted in one line per interval, and the end of the outage
    is logged too (at WARNING, like the outage itself), then a new outage starts over."""
    monkeypatch.setattr(middleware, "OUTAGE_LOG_INTERVAL", 0.5, raising=False)
    dist: Dist = await make_dist(
        redis=redis_server.url,
        postgres=None,
        sessions=SessionConfig(store_timeout=1.0),
        scheduler=SchedulerConfig(enabled=False),
    )

    async def write(request: Request) -> PlainTextResponse:
        request.session["k"] = "v"
        return PlainTextResponse("ok")

    async def read(request: Request) -> JSONResponse:
        return JSONResponse({"k": request.session.get("k")})

    async def lock(request: Request) -> PlainTextResponse:
        await get_locks().acquire("outage", timeout=0.5)  # 503 from inside the app
        return PlainTextResponse("locked")

    app = dist.wrap(
        Starlette(routes=[Route("/write", write), Route("/read", read), Route("/lock", lock)])
    )

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "asgi_dist" and "503" in r.getMessage()]

    caplog.set_level(logging.WARNING, logger="asgi_dist")
    async with _client(app) as client, _client(app) as cookieless:
        assert (await client.get("/write")).status_code == 200
        redis_server.kill()
        caplog.clear()
        answered = 0
        started = time.monotonic()
        while time.monotonic() - started < 1.3:  # 503s all along: the outage goes on
            # The session's load fails in the middleware, the lock inside the app.
            for c, path in ((client, "/read"), (cookieless, "/lock")):
                response = await c.get(path)
                assert response.status_code == 503, (path, response.text)
                answered += 1
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        during = lines()
        assert all(r.levelno == logging.WARNING for r in during)
        assert answered >= 10 and len(during) < answered / 3, f"{len(during)} lines for {answered}"
        first, summaries = during[0], during[1:]
        assert first.getMessage().startswith("http /read answered 503: the session store")
        assert f"127.0.0.1:{redis_server.port}" in first.getMessage()  # the cause
        assert "counted and logged once per 0.5 s" in first.getMessage()
        # One line per interval, however many requests: each is counted (the total below
        # counts the lock's 503s, answered inside the app, too).
        assert 1 <= len(summaries) <= elapsed / 0.5, [r.getMessage() for r in during]

        redis_server.start()
        assert (await client.get("/read")).status_code == 200
        deadline = time.monotonic() + 5
        while not any("no request answered 503" in r.getMessage() for r in lines()):
            assert time.monotonic() < deadline, "the end of the outage was never logged"
            await asyncio.sleep(0.05)
        *reports, end = lines()
        assert end.levelno == logging.WARNING
        counted = [int(re.findall(r"(\d+) more requests answered 503", r.getMessage())[0])
                   for r in reports[1:]]  # fmt: skip
        total = int(re.findall(r"answered (\d+) requests 503", end.getMessage())[0])
        unreported = int(re.findall(r"\((\d+) since the last report\)", end.getMessage())[0])
        assert total == answered == 1 + sum(counted) + unreported

        # The next outage is a new one: its first 503 is logged with its cause again.
        redis_server.kill()
        caplog.clear()
        assert (await client.get("/read")).status_code == 503
        assert [r.getMessage().split(":")[0] for r in lines()] == ["http /read answered 503"]
