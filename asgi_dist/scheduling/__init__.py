"""The cluster scheduler hosted in the ASGI lifespan."""

from asgi_dist.scheduling.jobs import JobContext, JobOptions
from asgi_dist.scheduling.scheduler import Scheduler, SchedulerConfig

__all__ = ["JobContext", "JobOptions", "Scheduler", "SchedulerConfig"]
