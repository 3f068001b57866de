"""The cluster scheduler hosted in the ASGI lifespan."""

from asgi_dist.scheduling.scheduler import Scheduler, SchedulerConfig

__all__ = ["Scheduler", "SchedulerConfig"]
