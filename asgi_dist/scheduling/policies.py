"""Pure decisions of the leader: misfire, jitter, and what a one-off may name."""

from __future__ import annotations

import importlib
import json
from typing import Any

from asgi_dist.errors import ConfigError
from asgi_dist.scheduling.jobs import Job, JobFunc, check_function, default_name
from asgi_dist.scheduling.schedules import period_after

__all__ = ["check_payload", "function_path", "jitter_cap_ms", "resolve_function", "runnable"]

MAX_PAYLOAD = 64 * 1024


def jitter_cap_ms(job: Job, fire_ms: int) -> int:
    """The largest random delay of a fire: ``jitter``, capped below the next fire."""
    if job.options.jitter <= 0:
        return 0
    cap = round(job.options.jitter * 1000)
    period = period_after(job.schedule, fire_ms)
    return cap if period is None else min(cap, int(period * 0.9))


def runnable(
    job: Job, fires: list[int], now: int, following: int | None, run_all_limit: int
) -> set[int]:
    """Which of ``fires`` (due, oldest first) start; the rest are recorded as missed."""
    grace = round(job.options.misfire_grace * 1000)
    on_time = {f for f in fires if now - f <= grace}
    late = [f for f in fires if now - f > grace]
    # Newer late fires beyond this bounded batch supersede the ones in it.
    more_late = following is not None and now - following > grace
    if not late or job.options.misfire == "skip" or more_late:
        return on_time
    keep = 1 if job.options.misfire == "run_once" else run_all_limit
    return on_time | set(late[-keep:])


def function_path(func: Any) -> str:
    """``module:qualname`` of a one-off's function, refused unless every node can import
    it: the leader, whichever node that is, resolves the path (nothing is pickled)."""
    check_function(func, default_name(func))
    module = getattr(func, "__module__", None) or "?"
    qualname = getattr(func, "__qualname__", None) or repr(func)
    path = f"{module}:{qualname}"
    fix = (
        "a one-off must be a module-level async function in a module that every node "
        "imports (e.g. myapp/tasks.py), so that whichever node leads can import it"
    )
    if module == "__main__":
        raise ConfigError(
            f"at(): {qualname} is defined in __main__, the script this process runs, which "
            f"other nodes cannot import: {fix}"
        )
    if "<" in qualname:  # <lambda>, <locals>: a closure or nested function
        raise ConfigError(f"at(): {path} is nested or a lambda: {fix}")
    try:
        resolved = resolve_function(path)
    except Exception:
        resolved = None
    if resolved is not func:
        raise ConfigError(f"at(): {path} cannot be imported by its path: {fix}")
    return path


def resolve_function(path: str) -> JobFunc:
    module_name, _, qualname = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    check_function(target, qualname)
    func: JobFunc = target
    return func


def check_payload(payload: Any) -> None:
    try:
        size = len(json.dumps(payload))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"payload must be JSON-serialisable: {exc}") from None
    if size > MAX_PAYLOAD:
        raise ConfigError(f"payload of {size} bytes exceeds the {MAX_PAYLOAD} byte bound")
