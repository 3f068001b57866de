"""Request-scoped locks and @dist.locked, in-process and across uvicorn processes."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from asgi_dist import Dist, LockTimeout
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
