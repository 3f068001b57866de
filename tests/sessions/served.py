"""The session test app for real uvicorn processes, configured from the environment.

ASGI_DIST_* as in ``Dist.from_env()``; SESSIONS_BACKEND selects the store,
SESSIONS_NEAR_CACHE=1 turns the near cache on.
"""

from __future__ import annotations

import os

from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig
from asgi_dist.sessions import SessionConfig
from tests.sessions.app import build

config = SessionConfig(
    backend=os.environ.get("SESSIONS_BACKEND", "redis"),  # type: ignore[arg-type]
    near_cache=os.environ.get("SESSIONS_NEAR_CACHE") == "1",
)
dist = Dist.from_env(sessions=config, scheduler=SchedulerConfig(enabled=False))
app = build(dist)
