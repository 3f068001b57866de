"""Lock tests run their Dists without the scheduler: it campaigns in the same
election machinery and would only add background traffic to what we measure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig


@pytest.fixture
def make_dist(make_dist: Callable[..., Any]) -> Callable[..., Any]:
    async def factory(**overrides: Any) -> Dist:
        overrides.setdefault("scheduler", SchedulerConfig(enabled=False))
        dist: Dist = await make_dist(**overrides)
        return dist

    return factory
