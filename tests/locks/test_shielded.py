"""Shielded cleanups: they finish after their caller left, and a failure is not
reported by asyncio as "Task exception was never retrieved"."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from asgi_dist.locks.lease import _background, _clean_up


async def test_a_cleanup_failing_after_its_caller_stopped_waiting_is_not_logged_as_lost() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    finished = asyncio.Event()

    async def cleanup() -> None:
        await asyncio.sleep(0.05)
        finished.set()
        raise ConnectionError("the backend went away")

    # Not patient: the backend just failed to answer, so the caller does not wait.
    await _clean_up(cleanup, "release a lease", patient=False)
    assert not finished.is_set()
    await asyncio.wait_for(finished.wait(), 5)  # it ran on after the caller left
    for _ in range(3):
        await asyncio.sleep(0)
    assert not _background
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported
