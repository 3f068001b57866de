"""Bounded polling for conditions that other processes make true."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(
    predicate: Callable[[], Awaitable[Any]], seconds: float = 30.0, what: str = ""
) -> None:
    """Poll ``predicate`` every 20 ms until it is true; fail after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {seconds}s: {what}")
