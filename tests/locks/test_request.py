"""Request-scoped locks and @dist.locked, in-process and across uvicorn processes."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from asgi_dist import Dist, LockTimeout, get_locks
from tests.helpers.processes import ProcessGroup
from tests.locks.app import create_app


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
    )


@pytest.fixture
async def dist(make_dist) -> Dist:
    d: Dist = await make_dist(postgres=None, sessions=False)
    return d


async def test_request_locks_are_released_when_the_response_ends(dist: Dist) -> None:
    async with _client(create_app(dist)) as client:
        first = await client.post("/sku/42")
        assert first.status_code == 200
        assert not await dist.lock("sku:42").locked()
        failed = await client.post("/sku/42", params={"fail": "true"})
        assert failed.status_code == 500
        assert not await dist.lock("sku:42").locked()
        again = await client.post("/sku/42")
        assert again.json()["fence"] > first.json()["fence"]


async def test_locked_endpoint_answers_409_with_retry_after_when_busy(dist: Dist) -> None:
    async with _client(create_app(dist)) as client:
        held = await dist.lock("order:7", ttl=20).acquire()
        busy = await client.post("/orders/7/pay")
        assert busy.status_code == 409
        assert 1 <= int(busy.headers["retry-after"]) <= 20
        other = await client.post("/orders/8/pay")
        assert other.status_code == 200
        await held.release()
        ok = await client.post("/orders/7/pay")
        assert ok.status_code == 200 and ok.json()["fence"] > held.fence
        assert not await dist.lock("order:7").locked()


async def test_request_lock_busy_past_its_timeout_answers_409(dist: Dist) -> None:
    held = await dist.lock("sku:1", ttl=20).acquire()
    async with _client(create_app(dist)) as client:
        response = await client.post("/sku/1")
    assert response.status_code == 409
    assert "sku:1" in response.text
    await held.release()


async def test_locked_outside_a_request_holds_the_lock_for_the_call(dist: Dist) -> None:
    @dist.locked("job:{job_id}", timeout=0)
    async def job(job_id: int) -> bool:
        return await dist.lock(f"job:{job_id}").locked()

    assert await job(job_id=3)
    held = await dist.lock("job:3").acquire()
    with pytest.raises(LockTimeout):
        await job(job_id=3)
    await held.release()


async def test_locked_endpoint_excludes_a_second_process(
    processes: ProcessGroup, redis_url: str, namespace: str
) -> None:
    env = {"ASGI_DIST_REDIS_URL": redis_url, "ASGI_DIST_NAMESPACE": namespace}
    a, b = processes.uvicorn("tests.locks.app:app", n=2, env=env)
    async with httpx.AsyncClient(timeout=30) as client:
        slow = asyncio.create_task(client.post(f"{a.url}/orders/5/pay", params={"hold": 1.5}))
        await asyncio.sleep(0.5)
        busy = await client.post(f"{b.url}/orders/5/pay")
        other = await client.post(f"{b.url}/orders/6/pay")
        first = await slow
        after = await client.post(f"{b.url}/orders/5/pay")
    assert first.status_code == 200
    assert busy.status_code == 409 and "retry-after" in busy.headers
    assert other.status_code == 200
    assert after.status_code == 200 and after.json()["fence"] > first.json()["fence"]


async def test_locked_quart_view_excludes_another_process_and_a_client_leaving_releases(
    processes: ProcessGroup, redis_url: str, namespace: str, dist: Dist
) -> None:
    """Quart under hypercorn: ``<int:order_id>`` fills the name (05 and 5 are one lock),
    a busy lock answers 409 + Retry-After, and a client that leaves mid-request
    (Quart cancels the view) leaves no lock behind."""
    env = {"ASGI_DIST_REDIS_URL": redis_url, "ASGI_DIST_NAMESPACE": namespace, "HOLD": "3"}
    [server] = processes.hypercorn("tests.locks.quart_app:app", env=env)
    async with httpx.AsyncClient(timeout=30) as client:
        slow = asyncio.create_task(client.post(f"{server.url}/orders/5/pay"))
        for _ in range(100):  # bounded: until the view holds the lock
            if await dist.lock("order:5").locked():
                break
            await asyncio.sleep(0.05)
        busy = await client.post(f"{server.url}/orders/05/pay")
        first = await slow
    assert busy.status_code == 409 and 1 <= int(busy.headers["retry-after"]) <= 30, busy.text
    assert first.status_code == 200 and first.json()["order"] == 5, server.output()
    for path, name in (("/orders/7/pay", "order:7"), ("/sku/a", "sku:a")):
        async with httpx.AsyncClient(timeout=0.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(f"{server.url}{path}")
        held = await dist.lock(name).acquire(timeout=2)  # the 3 s view was cancelled
        await held.release()


async def test_locked_names_a_lock_for_any_path_value_a_client_sends(dist: Dist) -> None:
    # Braces, control characters and '%' are escaped, a name too long is hashed:
    # client input is never a server error, and distinct values stay distinct locks.
    odd = ["a{b}", "a%7Bb%7D", "x\x7fy", "z" * 600, "z" * 601]
    async with _client(create_app(dist)) as client:
        names = []
        for value in odd:
            answer = await client.post(f"/carts/{quote(value, safe='')}/checkout")
            assert answer.status_code == 200, (value, answer.text)
            names.append(answer.json()["lock"])
        assert names[:3] == ["cart:a%7Bb%7D", "cart:a%257Bb%257D", "cart:x%7Fy"]
        assert names[3] != names[4] and names[3].startswith("cart:sha256:")
        held = await dist.lock("cart:a%7Bb%7D", ttl=20).acquire()  # the escaped "a{b}"
        busy = await client.post(f"/carts/{quote('a{b}', safe='')}/checkout")
        assert busy.status_code == 409
        other = await client.post(f"/carts/{quote('a%7Bb%7D', safe='')}/checkout")
        assert other.status_code == 200
        await held.release()


async def test_every_request_lock_is_released_when_the_request_is_cancelled_as_it_ends(
    dist: Dist,
) -> None:
    """A server cancels the request's task as its response ends (the client left): the
    cancellation lands while the first lock is being released, and must not leave the
    others held, renewed by the watchdog until the process stops."""
    names = ["cart:1", "cart:2", "cart:3"]

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        for name in names:
            await get_locks().acquire(name, ttl=1.0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = dist.wrap(endpoint)

    async def server() -> None:
        request = asyncio.current_task()
        assert request is not None

        async def send(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                request.cancel()  # delivered at the middleware's next await

        async def receive() -> Any:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
        await app(scope, receive, send)

    served = asyncio.create_task(server())
    await asyncio.gather(served, return_exceptions=True)
    await asyncio.sleep(1.5)  # past the 1 s ttl: only renewals would keep a lock now
    assert [name for name in names if await dist.lock(name).locked()] == []
    assert not dist.locks.watchdog.held
