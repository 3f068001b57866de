"""Jobs: what the decorators register, validated where they enter, and the context a run sees."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from asgi_dist._checks import seconds
from asgi_dist.backends.redis import validate_name
from asgi_dist.errors import ConfigError
from asgi_dist.scheduling.schedules import Schedule

__all__ = [
    "Job",
    "JobContext",
    "JobFunc",
    "JobOptions",
    "Misfire",
    "Overlap",
    "Registry",
    "RunOn",
]

Overlap = Literal["allow", "forbid", "replace"]
Misfire = Literal["skip", "run_once", "run_all"]
RunOn = Literal["leader", "any"]
JobFunc = Callable[["JobContext"], Awaitable[Any]]

_JOB_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
MAX_TIMEOUT = 7 * 86_400.0  # a week (longer runs: timeout=None); also misfire_grace's bound


@dataclass(frozen=True)
class JobOptions:
    """How a job runs; validated by :meth:`validate` when the decorator is applied."""

    overlap: Overlap = "allow"
    retries: int = 0
    timeout: float | None = None
    after: tuple[str, ...] = ()
    broadcast: bool = False
    run_on: RunOn = "leader"
    misfire: Misfire = "run_once"
    misfire_grace: float = 1.0
    jitter: float = 0.0

    def validate(self, name: str) -> None:
        where = f"job {name!r}:"
        if self.overlap not in ("allow", "forbid", "replace"):
            raise ConfigError(f"{where} overlap={self.overlap!r}: use allow, forbid or replace")
        if self.misfire not in ("skip", "run_once", "run_all"):
            raise ConfigError(f"{where} misfire={self.misfire!r}: use skip, run_once or run_all")
        if not isinstance(self.broadcast, bool):
            raise ConfigError(f"{where} broadcast={self.broadcast!r} must be True or False")
        if self.run_on not in ("leader", "any"):
            raise ConfigError(f"{where} run_on={self.run_on!r}: use 'leader' or 'any'")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            raise ConfigError(f"{where} retries={self.retries!r} must be an integer")
        if not 0 <= self.retries <= 100:
            raise ConfigError(f"{where} retries={self.retries!r} must be between 0 and 100")
        if self.timeout is not None:
            seconds(self.timeout, f"{where} timeout", low=0.0, high=MAX_TIMEOUT, open_low=True)
        seconds(self.misfire_grace, f"{where} misfire_grace", high=MAX_TIMEOUT)
        seconds(self.jitter, f"{where} jitter", high=86_400.0)
        if self.broadcast and self.run_on != "leader":
            raise ConfigError(f"{where} broadcast=True runs on every node; drop run_on")
        if name in self.after:
            raise ConfigError(f"{where} it cannot run after itself (after={list(self.after)})")


@dataclass(frozen=True)
class Job:
    name: str
    func: JobFunc
    schedule: Schedule
    options: JobOptions

    @property
    def signature(self) -> str:
        """Changes when the schedule changes; a new signature restarts the fire sequence."""
        return self.schedule.describe()


@dataclass
class JobContext:
    """What a running job knows about its fire.

    ``fire_id`` and ``fence`` let a task make its effects idempotent: the fence
    is the leader term that claimed the fire, strictly increasing across terms.
    """

    job: str
    fire_time: datetime
    fire_id: str
    fence: int
    attempt: int
    node_id: str
    shard_index: int = 0
    shard_total: int = 1
    payload: Any = None  # of a manual trigger or a one-off


def validate_job_name(name: str) -> str:
    if not isinstance(name, str) or not _JOB_NAME.fullmatch(name):
        raise ConfigError(
            f"job name {name!r} is invalid: use 1-200 letters, digits, '_', '.', or '-' "
            "(it becomes part of keys and fire ids)"
        )
    return validate_name(name, "job name")


def check_function(func: Any, name: str) -> None:
    if not callable(func) or not inspect.iscoroutinefunction(func):
        raise ConfigError(
            f"job {name!r}: {func!r} is not an async function; declare it `async def job(ctx)`"
        )


def default_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", "job")


class Registry:
    """The jobs of one Scheduler; refuses duplicates, unknown parents and cycles."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._jobs

    def __iter__(self) -> Any:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, name: str) -> Job | None:
        return self._jobs.get(name)

    def add(self, job: Job) -> None:
        if job.name in self._jobs:
            raise ConfigError(
                f"a job named {job.name!r} is already registered: pass name=... to tell them apart"
            )
        self._jobs[job.name] = job

    def check_dependencies(self) -> None:
        """Unknown parents and cycles are refused before the scheduler starts."""
        for job in self._jobs.values():
            for parent in job.options.after:
                if parent not in self._jobs:
                    raise ConfigError(
                        f"job {job.name!r} runs after {parent!r}, which is not registered: "
                        f"registered jobs are {sorted(self._jobs)}"
                    )
                if self._jobs[parent].options.broadcast:
                    raise ConfigError(
                        f"job {job.name!r} cannot run after {parent!r}: a broadcast fire has "
                        "one outcome per node, not one success to wait for"
                    )
        # Depth-first search with colours; the first back edge is the cycle.
        state: dict[str, int] = {}

        def visit(name: str, path: list[str]) -> None:
            state[name] = 1
            for parent in self._jobs[name].options.after:
                if state.get(parent) == 1:
                    cycle = [*path[path.index(parent) :], parent] if parent in path else [parent]
                    raise ConfigError(
                        "job dependencies form a cycle: " + " -> ".join(cycle) + "; remove one"
                    )
                if state.get(parent) is None:
                    visit(parent, [*path, parent])
            state[name] = 2

        for name in self._jobs:
            if name not in state:
                visit(name, [name])

    def children(self, parent: str) -> list[Job]:
        return [j for j in self._jobs.values() if parent in j.options.after]


def as_tuple(after: Sequence[str] | str | None) -> tuple[str, ...]:
    """``after=`` as job names, refused where it enters: a parent that is no job name
    (``after=5``, ``after=[None]``) would otherwise fail later, or far from its cause."""
    if after is None:
        return ()
    names = (after,) if isinstance(after, str) else after
    if not isinstance(names, list | tuple | set | frozenset):
        raise ConfigError(f"after={after!r} must be a job name or a list of job names")
    for parent in names:
        if not isinstance(parent, str):
            raise ConfigError(f"after={after!r}: {parent!r} is not a job name (a string)")
        validate_job_name(parent)
    return tuple(names)
