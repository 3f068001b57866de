"""Mistakes a first-time user makes, each answered with the problem and the fix."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_dist import ConfigError, Dist
from tests.conftest import SECRET_KEYS
from tests.helpers.processes import ROOT
from tests.helpers.servers import free_port


async def test_a_mounted_wrapped_sub_app_that_never_started_refuses_requests_naming_the_fix(
    redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    """Starlette runs no lifespan for a mounted app: its Dist never starts, so its jobs
    never run and its locks refuse; its requests must not half work meanwhile."""
    dist = Dist(redis_url, postgres_dsn, namespace=namespace, secret_keys=SECRET_KEYS)

    async def visit(request: Request) -> JSONResponse:
        request.session["visits"] = request.session.get("visits", 0) + 1
        return JSONResponse({"visits": request.session["visits"]})

    sub = dist.wrap(Starlette(routes=[Route("/", visit)]))
    outer = Starlette(routes=[Mount("/sub", app=sub)])
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(ConfigError, match=r"before its Dist was started.*Mount"):
            await client.get("/sub/")
    assert not dist.started

    # The fix the message names: wrap the outermost app; then it serves.
    dist = Dist(redis_url, postgres_dsn, namespace=namespace, secret_keys=SECRET_KEYS)
    outer = dist.wrap(Starlette(routes=[Mount("/sub", app=Starlette(routes=[Route("/", visit)]))]))
    transport = httpx.ASGITransport(app=outer)
    async with dist, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/sub/")).json() == {"visits": 1}
        assert (await client.get("/sub/")).json() == {"visits": 2}


def test_the_shop_without_secret_keys_fails_its_startup_instead_of_serving_500s(
    redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    """examples/shop uses app.add_middleware(DistMiddleware, ...), which Starlette builds
    inside the lifespan: a ConfigError there looked to uvicorn like an app without
    lifespan, so it started, logged that at INFO and answered every request 500."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_DIST_")}
    env.update(
        ASGI_DIST_REDIS_URL=redis_url,
        ASGI_DIST_POSTGRES_DSN=postgres_dsn,
        ASGI_DIST_NAMESPACE=namespace,
        PYTHONPATH=str(ROOT),
    )
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "examples.shop.app:app", "--port", str(port)]
    try:
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"uvicorn kept serving without secret keys: {exc.stderr!r}")
    assert run.returncode == 3, run.stderr  # uvicorn's "startup failed"
    assert "secret_keys is required" in run.stderr
    assert "lifespan' protocol appears unsupported" not in run.stderr


async def test_quart_answers_an_outage_met_in_a_view_with_503_and_logs_it(
    redis_url: str, postgres_dsn: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Quart turns a view's exception into its own 500 page before the middleware
    sees it: init_app must map every outage the middleware maps (a view's own
    asyncpg call included), and report it to the outage log as Starlette does."""
    from quart import Quart

    from asgi_dist.integrations.quart import init_app

    dist = Dist(redis_url, postgres_dsn, namespace=namespace, secret_keys=SECRET_KEYS)
    app = Quart(__name__)
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/test"

    @app.get("/report")
    async def report() -> str:
        conn = await asyncpg.connect(unreachable, timeout=5)  # refused: the server is down
        await conn.close()
        return "unreachable"

    init_app(app, dist)
    caplog.set_level(logging.WARNING, logger="asgi_dist")
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/report")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert any("/report answered 503" in r.getMessage() for r in caplog.records)


async def test_installing_the_middleware_twice_with_one_dist_is_refused_naming_both_forms(
    redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    """add_middleware and dist.wrap on one app ran each request through the Dist twice,
    with a warning blaming "another middleware (Starlette's SessionMiddleware?)"."""
    from fastapi import FastAPI
    from quart import Quart

    from asgi_dist import DistMiddleware
    from asgi_dist.integrations.quart import init_app

    dist = Dist(redis_url, postgres_dsn, namespace=namespace, secret_keys=SECRET_KEYS)
    api = FastAPI()
    api.add_middleware(DistMiddleware, dist=dist)
    with pytest.raises(ConfigError, match=r"already has DistMiddleware.*install it once"):
        dist.wrap(api)
    with pytest.raises(ConfigError, match="already has DistMiddleware"):
        dist.wrap(dist.wrap(Starlette()))
    quart = init_app(Quart(__name__), dist)
    with pytest.raises(ConfigError, match=r"init_app\(\) was already called"):
        init_app(quart, dist)

    # One form alone serves, once per request.
    other = Dist(redis_url, postgres_dsn, namespace=namespace, secret_keys=SECRET_KEYS)
    served = FastAPI()

    @served.get("/")
    async def visit(request: Request) -> dict[str, int]:
        request.session["visits"] = request.session.get("visits", 0) + 1
        return {"visits": request.session["visits"]}

    served.add_middleware(DistMiddleware, dist=other)
    transport = httpx.ASGITransport(app=served)
    async with other, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/")).json() == {"visits": 1}
        assert (await client.get("/")).json() == {"visits": 2}


async def test_from_env_takes_values_from_a_crlf_env_file_and_names_the_variable_at_fault(
    redis_url: str, postgres_dsn: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An env file saved with CRLF line ends (docker --env-file, systemd) leaves a
    trailing '\\r' in every value: it made 'database 0\\r is not a number'."""
    for name in [k for k in os.environ if k.startswith("ASGI_DIST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ASGI_DIST_REDIS_URL", redis_url + "\r")
    monkeypatch.setenv("ASGI_DIST_POSTGRES_DSN", postgres_dsn + "\r")
    monkeypatch.setenv("ASGI_DIST_NAMESPACE", namespace + "\r")
    monkeypatch.setenv("ASGI_DIST_SECRET_KEYS", ",".join(SECRET_KEYS) + "\r")
    monkeypatch.setenv("ASGI_DIST_LEADER_TTL", "15\r")
    dist = Dist.from_env()
    assert dist.namespace == namespace
    async with dist, dist.lock("onboarding", timeout=5.0) as held:
        assert held.fence >= 1
        assert await dist.runtime.postgres.pool.fetchval("SELECT 1") == 1  # type: ignore[union-attr]

    monkeypatch.setenv("ASGI_DIST_NAMESPACE", "My-Shop")
    with pytest.raises(ConfigError, match=r"namespace='My-Shop'.*read .*ASGI_DIST_NAMESPACE"):
        Dist.from_env()


async def test_quart_views_may_use_quarts_own_session_beside_ours(
    redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    """Quart's cookie session (quart.session) was also named 'session': each view that
    touched it sent a Set-Cookie that replaced ours, and the asgi_dist session was lost."""
    from quart import Quart
    from quart import session as quart_session

    from asgi_dist import get_session
    from asgi_dist.integrations.quart import init_app

    dist = Dist(redis_url, postgres_dsn, namespace=namespace, secret_keys=SECRET_KEYS)
    app = Quart(__name__)
    app.secret_key = SECRET_KEYS[0]

    @app.post("/visit")
    async def visit() -> dict[str, int]:
        quart_session["flash"] = "hello"  # e.g. a flash message
        session = get_session()
        session["visits"] = session.get("visits", 0) + 1
        return {"visits": session["visits"]}

    init_app(app, dist)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        seen = [(await (await client.post("/visit")).get_json())["visits"] for _ in range(3)]
    assert seen == [1, 2, 3]


async def test_get_session_in_a_thread_without_the_request_context_names_the_fix(
    redis_url: str, postgres_dsn: str, namespace: str
) -> None:
    """loop.run_in_executor runs without the request's context: "outside a request"
    alone misled a view that plainly runs inside one."""
    import asyncio

    from asgi_dist import NoRequestContext, get_session

    dist = Dist(redis_url, postgres_dsn, namespace=namespace, secret_keys=SECRET_KEYS)
    errors: list[str] = []

    def blocking_work() -> int:
        try:
            return int(get_session().get("visits", 0))
        except NoRequestContext as exc:
            errors.append(str(exc))
            return -1

    async def view(request: Request) -> JSONResponse:
        request.session["visits"] = 1
        in_executor = await asyncio.get_running_loop().run_in_executor(None, blocking_work)
        in_thread = await asyncio.to_thread(blocking_work)  # copies the context
        return JSONResponse([in_executor, in_thread])

    app = dist.wrap(Starlette(routes=[Route("/", view)]))
    transport = httpx.ASGITransport(app=app)
    async with dist, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/")).json() == [-1, 1]
    (message,) = errors
    assert "run_in_executor does not" in message and "asyncio.to_thread" in message
