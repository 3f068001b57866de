"""One request at a time, on each store: cookies, fresh ids, deltas, lifecycle."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_dist import SessionConfig, get_session
from asgi_dist.sessions.postgres import MIGRATIONS
from tests.sessions.app import put
from tests.sessions.conftest import client, set_cookie

BACKENDS = ["redis", "postgres", "memory"]


@pytest.fixture(params=BACKENDS)
async def dist(request: pytest.FixtureRequest, session_dist: Callable[..., Any]) -> Any:
    return await session_dist(request.param)


async def test_a_write_sets_a_signed_httponly_lax_cookie_and_the_next_request_reads_it(
    dist: Any,
) -> None:
    async with client(dist) as c:
        r = await c.post("/set/color/blue")
        cookie = set_cookie(r)
        assert cookie is not None and cookie.startswith("session=")
        attrs = [a.strip() for a in cookie.split(";")]
        assert "HttpOnly" in attrs and "SameSite=Lax" in attrs and "Path=/" in attrs
        assert "Secure" not in attrs  # plain http
        assert r.headers["vary"] == "Cookie"
        value = attrs[0].removeprefix("session=")
        assert len(value.partition(".")[0]) == 46  # 264 random bits plus the shard
        r = await c.get("/get/color")
        assert r.json()["value"] == "blue"
        assert set_cookie(r) is None  # read-only: nothing written, no cookie


async def test_a_request_that_writes_nothing_gets_no_cookie(dist: Any) -> None:
    async with client(dist) as c:
        r = await c.get("/get/color")
        assert r.json()["value"] is None
        assert set_cookie(r) is None
        r = await c.get("/noop")
        assert "vary" not in r.headers  # the session was never read


async def test_a_forged_cookie_gets_a_fresh_session_with_a_new_id(dist: Any) -> None:
    async with client(dist) as c:
        await c.post("/set/a/1")
        real = c.cookies["session"]
        session_id, _, sig = real.partition(".")
        forged_id = session_id[:-1] + ("A" if session_id[-1] != "A" else "B")
        c.cookies.clear()
        c.cookies.set("session", f"{forged_id}.{sig}")
        r = await c.get("/all")
        assert r.json()["data"] == {}
        r = await c.post("/set/b/2")
        new_id = set_cookie(r).split(";")[0].removeprefix("session=").partition(".")[0]  # type: ignore[union-attr]
        assert new_id not in (forged_id, session_id)
        c.cookies.clear()
        c.cookies.set("session", session_id)  # unsigned
        assert (await c.get("/all")).json()["data"] == {}


async def test_an_absurdly_long_cookie_is_ignored(dist: Any) -> None:
    async with client(dist) as c:
        c.cookies.set("session", "x" * 100_000)
        r = await c.get("/all")
        assert r.status_code == 200 and r.json()["data"] == {}


async def test_our_cookie_is_found_behind_another_of_the_same_name(dist: Any) -> None:
    """A browser sends every cookie of the name in scope (another app's, set on the
    parent domain, comes first if older): ours must still be read, or the user could
    never keep a session."""
    async with client(dist) as c:
        await c.post("/set/k/v")
        ours = c.cookies["session"]
        c.cookies.clear()
        theirs = "eyJ1c2VyIjogMX0=.ZxYw.c2lnbmF0dXJl"  # e.g. Starlette's signed cookie
        r = await c.get("/get/k", headers={"cookie": f"session={theirs}; session={ours}"})
        assert r.json()["value"] == "v"


async def test_in_place_changes_of_a_stored_list_persist(dist: Any) -> None:
    async with client(dist) as c:
        await c.post("/append/one")
        await c.post("/append-in-place/two")
        assert (await c.get("/get/items")).json()["value"] == ["one", "two"]


async def test_regenerate_moves_the_data_to_a_new_id_and_the_old_one_works_only_in_grace(
    session_dist: Callable[..., Any],
) -> None:
    for backend in BACKENDS:
        dist = await session_dist(backend, regenerate_grace=1.0, namespace=f"g_{backend}_x")
        async with client(dist) as c:
            await c.post("/set/cart/3")
            old_cookie = c.cookies["session"]
            r = await c.post("/login/alice")
            ids = r.json()
            assert ids["old"] != ids["new"] and ids["old"][:2] == ids["new"][:2]
            assert set_cookie(r) is not None
            assert c.cookies["session"] != old_cookie
            body = (await c.get("/all")).json()
            assert (body["data"], body["user"]) == ({"cart": "3"}, "alice")
            async with client(dist) as parallel:
                parallel.cookies.set("session", old_cookie)
                assert (await parallel.get("/get/cart")).json()["value"] == "3", backend
                # A write through the old id is dropped, and does not expire the cookie
                # (the browser holds the new one); it never reaches the new session.
                r = await parallel.post("/set/stale/1")
                assert r.status_code == 200 and set_cookie(r) is None, backend
                await asyncio.sleep(1.3)
                assert (await parallel.get("/get/cart")).json()["value"] is None, backend
            assert (await c.get("/all")).json()["data"] == {"cart": "3"}, backend


async def test_invalidate_deletes_the_session_and_expires_the_cookie(dist: Any) -> None:
    async with client(dist) as c:
        await c.post("/set/a/1")
        old = c.cookies["session"]
        r = await c.post("/logout")
        cookie = set_cookie(r)
        assert cookie is not None and "Max-Age=0" in cookie
        c.cookies.set("session", old)
        assert (await c.get("/all")).json()["data"] == {}
        # A signed id the store does not know is never adopted: a write gets a new id.
        r = await c.post("/set/b/2")
        assert _cookie_value(r).partition(".")[0] != old.partition(".")[0]


async def test_invalidate_user_ends_all_three_sessions_of_a_user(dist: Any) -> None:
    browsers = [client(dist) for _ in range(3)]
    other = client(dist)
    try:
        for i, b in enumerate(browsers):
            await b.post(f"/set/n/{i}")
            await b.post("/login/bob")
        await other.post("/login/carol")
        listed = await dist.sessions.list_user("bob")
        assert len(listed) == 3 and all(s.user_id == "bob" for s in listed)
        # A logout drops the session from the index on the next access.
        await browsers[2].post("/logout")
        assert len(await dist.sessions.list_user("bob")) == 2
        assert await dist.sessions.invalidate_user("bob") == 2
        for b in browsers:
            body = (await b.get("/all")).json()
            assert (body["data"], body["user"]) == ({}, None)
        assert await dist.sessions.list_user("bob") == []
        assert (await other.get("/all")).json()["user"] == "carol"
    finally:
        for b in [*browsers, other]:
            await b.aclose()


async def test_invalidate_user_also_ends_an_old_id_still_in_its_regenerate_grace(
    dist: Any,
) -> None:
    """After regenerate() the old id stays readable, as the same user, for the grace
    period: logging that user out everywhere must end it too (a stolen old cookie)."""
    async with client(dist) as c:
        old = (await c.post("/login/frank")).cookies["session"]
        c.cookies.clear()
        r = await c.post("/login/frank", headers={"cookie": f"session={old}"})  # rotated
        new = r.cookies["session"]
        c.cookies.clear()
        for cookie in (old, new):
            r = await c.get("/all", headers={"cookie": f"session={cookie}"})
            assert r.json()["user"] == "frank"
        assert len(await dist.sessions.list_user("frank")) == 1  # the old id is not listed
        assert await dist.sessions.invalidate_user("frank") == 1
        for cookie in (old, new):
            r = await c.get("/all", headers={"cookie": f"session={cookie}"})
            assert r.json()["user"] is None, "a session of the user survived logout-everywhere"


async def test_a_session_over_max_size_raises_and_nothing_is_stored(
    session_dist: Callable[..., Any],
) -> None:
    dist = await session_dist("redis", max_size=1024)
    async with client(dist) as c:
        await c.post("/set/small/1")
        r = await c.post("/big/5000")
        assert r.status_code == 413 and "max_size=1024" in r.text
        assert (await c.get("/all")).json()["data"] == {"small": "1"}
        assert (await c.post("/big/500")).text == "stored"


async def test_a_non_json_value_raises_a_type_error_naming_the_key() -> None:
    from asgi_dist.sessions import Session

    session = Session(None)
    with pytest.raises(TypeError, match=r"session\['when'\] = object is not JSON"):
        session["when"] = object()
    assert "when" not in session


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_a_key_no_store_can_keep_raises_a_value_error_on_every_store(
    backend: str, session_dist: Callable[..., Any]
) -> None:
    """PostgreSQL refuses NUL in a key and no store takes a lone surrogate: refused
    where the key is set, the same on every store, not a 500 when the response starts."""
    dist = await session_dist(backend)
    async with client(dist) as c:
        assert (await c.post("/put", content=json.dumps({"ok": 1}))).status_code == 200
        for key in ("a\x00b", "\ud800"):
            with pytest.raises(ValueError, match="cannot be stored"):
                await c.post("/put", content=json.dumps({key: 1}))
        shown = ast.literal_eval((await c.get("/show")).text)
        assert shown == {"ok": 1}


async def test_a_request_that_fails_with_a_5xx_saves_none_of_its_changes(dist: Any) -> None:
    """Half a failed request's changes must not persist (its transaction rolls back);
    a regenerate() done before the failure already moved the session: the cookie
    follows it."""

    async def crash(request: Request) -> Response:
        request.session["cart"] = []  # emptied, then the order fails
        raise RuntimeError("the order failed")

    async def unavailable(request: Request) -> Response:
        request.session["cart"] = []
        return PlainTextResponse("try later", status_code=503)

    async def login_then_crash(request: Request) -> Response:
        request.session["user"] = "frank"
        await request.session.regenerate()
        raise RuntimeError("the audit log failed")

    async def cart(request: Request) -> Response:
        return JSONResponse({"cart": request.session.get("cart"), "id": get_session().id})

    app = dist.wrap(
        Starlette(
            routes=[
                Route("/put", put, methods=["POST"]),
                Route("/crash", crash, methods=["POST"]),
                Route("/unavailable", unavailable, methods=["POST"]),
                Route("/login-then-crash", login_then_crash, methods=["POST"]),
                Route("/cart", cart),
            ]
        )
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        assert (await c.post("/put", content='{"cart": ["apple"]}')).status_code == 200
        old_id = (await c.get("/cart")).json()["id"]
        for path in ("/crash", "/unavailable"):
            r = await c.post(path)
            assert r.status_code in (500, 503) and set_cookie(r) is None
            assert (await c.get("/cart")).json()["cart"] == ["apple"], path
        r = await c.post("/login-then-crash")
        assert r.status_code == 500 and set_cookie(r) is not None  # the new id
        after = (await c.get("/cart")).json()
        assert after["cart"] == ["apple"] and after["id"] != old_id


def _cookie_value(response: Any) -> str:
    header = set_cookie(response)
    assert header is not None
    return header.split(";")[0].removeprefix("session=")


async def test_https_sets_secure_and_rotated_keys_are_resigned_on_the_next_write(
    session_dist: Callable[..., Any], namespace: str
) -> None:
    old_key, new_key = "old-secret-key-0123456789abc", "new-secret-key-0123456789abc"
    dist_old = await session_dist("redis", secret_keys=[old_key])
    async with client(dist_old, "https://testserver") as c:
        r = await c.post("/set/k/v")
        assert "Secure" in set_cookie(r)  # type: ignore[operator]
        cookie = _cookie_value(r)
    dist_ring = await session_dist("redis", secret_keys=[new_key, old_key])
    dist_new = await session_dist("redis", secret_keys=[new_key])
    async with client(dist_ring) as c, client(dist_new) as only_new:

        def sent(value: str) -> dict[str, str]:
            return {"cookie": f"session={value}"}

        r = await only_new.get("/get/k", headers=sent(cookie))
        assert r.json()["value"] is None  # signed with a key it does not hold
        r = await c.get("/get/k", headers=sent(cookie))
        assert r.json()["value"] == "v" and set_cookie(r) is None  # a read does not re-sign
        r = await c.post("/set/k2/v2", headers=sent(cookie))
        resigned = _cookie_value(r)
        assert resigned != cookie
        assert resigned.partition(".")[0] == cookie.partition(".")[0]  # same id
        r = await only_new.get("/get/k2", headers=sent(resigned))
        assert r.json()["value"] == "v2"


async def test_the_size_limit_counts_deleted_and_replaced_keys_correctly() -> None:
    from asgi_dist import SessionTooLarge
    from asgi_dist.sessions import Session

    session = Session(None, max_size=1000)
    session["a"] = "x" * 600
    with pytest.raises(SessionTooLarge):
        session["b"] = "y" * 600  # 1200 bytes: refused, and not stored
    assert "b" not in session
    del session["a"]
    session["b"] = "y" * 600  # fits once "a" is gone
    session["b"] = "z" * 900  # replacing counts the new value, not both
    with pytest.raises(SessionTooLarge):
        session["c"] = "w" * 100
    assert dict(session) == {"b": "z" * 900}


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
async def test_every_json_value_reads_back_exactly_on_every_store(
    backend: str, session_dist: Callable[..., Any]
) -> None:
    """PostgreSQL's JSONB alone would refuse NUL and lone surrogates and read 1e16 as
    an int; values are kept as their JSON text instead."""
    dist = await session_dist(backend)
    values = {
        "nul": "a\x00b",
        "surrogate": "\ud800",
        "float": 1e16,
        "tiny": 5e-324,
        "nested": {"x": [1.0, 2, "é", None, True]},
        "ü key": "ü",
    }
    body = json.dumps(values)
    async with client(dist) as c:
        assert (await c.post("/put", content=body)).status_code == 200
        shown = ast.literal_eval((await c.get("/show")).text)
    assert shown == values  # key order aside (PostgreSQL's is its own)
    assert type(shown["float"]) is float


async def test_sessions_stored_before_exact_values_are_migrated_to_them(
    postgres_dsn: str, namespace: str, make_dist: Callable[..., Any]
) -> None:
    """Rows of the first schema (values as JSONB) get their JSON texts at start."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(MIGRATIONS[0].format(ns=namespace))
        await conn.execute(
            f"CREATE TABLE {namespace}_schema_migrations (capability text NOT NULL,"
            " version int NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),"
            " node_id text NOT NULL, PRIMARY KEY (capability, version))"
        )
        await conn.execute(
            f"INSERT INTO {namespace}_schema_migrations VALUES ('sessions', 1, now(), 'old')"
        )
        await conn.execute(
            f"INSERT INTO {namespace}_sessions (key, data, created, accessed, expires)"
            """ VALUES ('k', '{"cart": [1, "a"], "n": 2.5}', now(), now(), now() + '1h')"""
        )
        await make_dist(redis=None, sessions=SessionConfig(backend="postgres"))
        fields = await conn.fetchval(f"SELECT fields::text FROM {namespace}_sessions")
    finally:
        await conn.close()
    assert {k: json.loads(v) for k, v in json.loads(fields).items()} == {
        "cart": [1, "a"],
        "n": 2.5,
    }


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_value_nested_too_deep_is_refused_clearly_and_nothing_else_is_lost(
    backend: str, session_dist: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """JSON nesting is encoded and decoded by recursion: a value ~1000 levels deep made
    a RecursionError (a 500 saying nothing useful). It is refused where it enters: a
    TypeError on assignment, a SessionError on an in-place change; the rest stays."""

    async def deep(request: Request) -> Response:
        request.session["note"] = "kept"
        try:
            request.session["tree"] = _nested(int(request.path_params["depth"]))
        except TypeError as exc:
            return PlainTextResponse(str(exc), status_code=422)
        return PlainTextResponse("stored")

    async def deepen(request: Request) -> Response:
        request.session["flat"].append(_nested(int(request.path_params["depth"])))
        return PlainTextResponse("changed")

    async def show(request: Request) -> Response:
        return JSONResponse(dict(request.session))

    dist = await session_dist(backend)
    app = dist.wrap(
        Starlette(
            routes=[
                Route("/deep/{depth}", deep, methods=["POST"]),
                Route("/deepen/{depth}", deepen, methods=["POST"]),
                Route("/show", show),
                Route("/put", put, methods=["POST"]),
            ]
        )
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        for depth in (1000, 101):
            r = await c.post(f"/deep/{depth}")
            assert r.status_code == 422, (depth, r.text)
            assert "session['tree'] = list is nested more than 100 lists/dicts deep" in r.text
            assert "store flatter data" in r.text
        assert (await c.get("/show")).json() == {"note": "kept"}
        assert (await c.post("/deep/100")).text == "stored"  # the deepest allowed
        assert (await c.post("/put", content='{"flat": []}')).status_code == 200
        stored = (await c.get("/show")).json()
        assert stored == {"note": "kept", "tree": _nested(100), "flat": []}
        for depth in (1000, 100):  # one level more in the list: 1001 and 101
            caplog.clear()
            r = await c.post(f"/deepen/{depth}")
            assert r.status_code == 500, (depth, r.text)
            assert "session['flat'] was changed in place and is nested more than 100" in (
                caplog.text
            )
            assert "RecursionError" not in caplog.text
        assert (await c.get("/show")).json() == stored


@pytest.mark.parametrize("backend", ["redis", "redis-near", "postgres", "memory"])
async def test_a_logout_after_a_rotated_login_also_ends_the_ids_it_rotated_from(
    backend: str, session_dist: Callable[..., Any]
) -> None:
    """regenerate() keeps the old id readable, as the same user, for its grace period:
    a logout through the new id must end the old ones too, or a stolen old cookie
    stays logged in after the user logged out."""
    options = {"near_cache": True} if backend == "redis-near" else {}
    dist = await session_dist(backend.removesuffix("-near"), **options)
    async with client(dist) as c:
        cookies = [(await c.post("/login/gina")).cookies["session"]]
        for _ in range(2):  # logged in again twice: A -> B -> C
            c.cookies.clear()
            r = await c.post("/login/gina", headers={"cookie": f"session={cookies[-1]}"})
            cookies.append(r.cookies["session"])
        c.cookies.clear()
        for cookie in cookies:
            r = await c.get("/all", headers={"cookie": f"session={cookie}"})
            assert r.json()["user"] == "gina"
        r = await c.post("/logout", headers={"cookie": f"session={cookies[-1]}"})
        assert "Max-Age=0" in (set_cookie(r) or "")
        c.cookies.clear()
        for cookie in cookies:
            r = await c.get("/all", headers={"cookie": f"session={cookie}"})
            assert (r.json()["data"], r.json()["user"]) == ({}, None), "a rotated id survived"
        assert await dist.sessions.list_user("gina") == []
        # Another user's rotated session is untouched by this logout.
        first = (await c.post("/login/hugo")).cookies["session"]
        c.cookies.clear()
        r = await c.post("/login/hugo", headers={"cookie": f"session={first}"})
        c.cookies.clear()
        r = await c.get("/all", headers={"cookie": f"session={first}"})
        assert r.json()["user"] == "hugo"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_request_that_only_deletes_keys_is_allowed_over_a_lowered_max_size(
    backend: str, session_dist: Callable[..., Any]
) -> None:
    """A session stored under a larger max_size stays over a lowered one until it
    shrinks: a request that only deletes keys must go through on every store (Redis
    let it, PostgreSQL and memory refused it), one that sets something must not."""
    before = await session_dist(backend, max_size=2000)
    async with client(before) as c:
        body = {"a": "x" * 600, "b": "y" * 600, "c": "z" * 600}  # 1803 bytes
        assert (await c.post("/put", content=json.dumps(body))).status_code == 200
        cookie = c.cookies["session"]
    if backend == "memory":  # one process: lower the limit in place
        lowered = dataclasses.replace(before.sessions.config, max_size=1000)
        before.sessions.config = before.sessions.store.config = lowered  # type: ignore[attr-defined]
        after = before
    else:  # a redeploy with the lower limit, on the same store
        after = await session_dist(backend, max_size=1000)
    async with client(after) as c:
        c.cookies.set("session", cookie)
        r = await c.post("/del/a")  # still 1202 bytes, over 1000: but smaller
        assert r.status_code == 200, r.text
        assert sorted((await c.get("/all")).json()["data"]) == ["b", "c"]
        r = await c.post("/big/10")  # sets something: refused while over the limit
        assert r.status_code == 413 and "max_size=1000" in r.text
        assert (await c.post("/del/b")).status_code == 200  # 601 bytes: under it again
        assert (await c.post("/set/d/1")).status_code == 200
        assert sorted((await c.get("/all")).json()["data"]) == ["c", "d"]
