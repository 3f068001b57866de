"""A lost lease stops the work it protected: the body of ``async with`` and the
request that took a request-scoped lock are cancelled, and cancelled again until
they exit even if a client library swallowed the first cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from asgi_dist import Dist, LockLost, get_locks


@pytest.fixture
async def dist(make_dist) -> Dist:
    d: Dist = await make_dist(postgres=None, sessions=False)
    return d


async def _take_over(dist: Dist, name: str) -> None:
    """Another owner's view: the lease key vanishes, so the next renewal fails."""
    redis = dist.locks.runtime.redis
    assert redis is not None
    await redis.client.delete(redis.key("lock", name, "lease"))


async def test_a_body_that_swallows_the_cancellation_is_cancelled_again_until_it_exits(
    dist: Dist,
) -> None:
    swallowed = 0
    reached_the_end = False
    # The bound only turns a hang into a failure; the body would sleep 15 s.
    async with asyncio.timeout(10):
        with pytest.raises(LockLost):
            async with dist.lock("k", ttl=0.6) as held:
                await _take_over(dist, "k")
                for _ in range(2):
                    try:
                        await asyncio.sleep(5)
                    except asyncio.CancelledError:
                        swallowed += 1  # what a library absorbing it does
                await asyncio.sleep(5)
                reached_the_end = True
    assert held.lost.is_set()
    assert swallowed == 2 and not reached_the_end
    # Every cancellation of ours was undone: the task is not left "cancelling".
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.2)  # no late re-cancel lands after the block


def _app(dist: Dist, progress: dict[str, Any]) -> Any:
    app = FastAPI()

    @app.post("/locked/{order_id}")
    @dist.locked("order:{order_id}", ttl=0.6)
    async def locked(order_id: int) -> dict[str, object]:
        (held,) = get_locks().held
        progress["held"] = held
        await _take_over(dist, f"order:{order_id}")
        await asyncio.sleep(5)
        progress["finished"] = True
        return {}

    @app.post("/scoped")
    async def scoped() -> dict[str, object]:
        progress["held"] = await get_locks().acquire("sku:1", ttl=0.6)
        await _take_over(dist, "sku:1")
        for _ in range(2):
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                progress["swallowed"] = progress.get("swallowed", 0) + 1
        await asyncio.sleep(5)
        progress["finished"] = True
        return {}

    return dist.wrap(app)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
    )


async def test_locked_endpoint_whose_lease_is_lost_is_cancelled_with_lock_lost(
    dist: Dist,
) -> None:
    progress: dict[str, Any] = {}
    async with _client(_app(dist, progress)) as client:
        async with asyncio.timeout(10):
            response = await client.post("/locked/7")
    assert progress["held"].lost.is_set()
    assert "finished" not in progress, "the endpoint ran on after its lease was lost"
    # The lease was taken over (not an outage): LockLost is answered 409.
    assert response.status_code == 409 and "was lost" in response.text
    assert not await dist.lock("order:7").locked()


async def test_request_scoped_lock_loss_cancels_the_request_task(dist: Dist) -> None:
    progress: dict[str, Any] = {}
    async with _client(_app(dist, progress)) as client:
        # ASGITransport runs the app in the calling task: give it its own.
        request = asyncio.create_task(client.post("/scoped"))
        done, _ = await asyncio.wait([request], timeout=10)
    assert done, "the request survived the loss of its lock"
    assert progress["held"].lost.is_set()
    # Cancelled again after each swallowed cancellation; never finished.
    assert progress["swallowed"] == 2 and "finished" not in progress
    # The middleware turns that cancellation into the request's LockLost: a 409.
    response = request.result()
    assert response.status_code == 409 and "was lost during the request" in response.text
