"""Run several real OS processes of an app or a worker, and signal them.

``ProcessGroup.uvicorn("tests.apps.basic:app", n=3, env={...})`` starts three
uvicorn servers on free ports; ``ProcessGroup.python(code, n=8)`` runs a Python
snippet in N processes (e.g. ``async with dist:`` workers).  Every process can be
SIGKILLed, SIGSTOPped and SIGCONTinued, and all are killed when the group closes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tests.helpers.servers import free_port, wait_port

__all__ = ["ProcessGroup", "Worker"]

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    def __init__(
        self, proc: subprocess.Popen[bytes], port: int | None, log: Path, own_session: bool = False
    ) -> None:
        self.proc = proc
        self.own_session = own_session
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ProcessGroup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.workers: list[Worker] = []

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        merged = dict(os.environ)
        merged["PYTHONPATH"] = os.pathsep.join([str(ROOT), merged.get("PYTHONPATH", "")])
        merged.update(env or {})
        return merged

    def uvicorn(
        self,
        app: str,
        n: int = 1,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        loop: str = "auto",
    ) -> list[Worker]:
        """Start ``n`` uvicorn servers of ``module:attr`` on free ports; wait until they listen.

        ``loop`` is uvicorn's ``--loop``: ``auto`` picks uvloop, which the test
        extras install, as it does in a ``uvicorn[standard]`` deployment."""
        return self._servers(
            "uvicorn", n, env, timeout,
            lambda port: [app, "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on",
                          "--log-level", "warning", "--loop", loop],
        )  # fmt: skip

    def hypercorn(
        self, app: str, n: int = 1, env: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> list[Worker]:
        """Start ``n`` hypercorn servers (Quart's own) of ``module:attr``, as :meth:`uvicorn`."""
        return self._servers(
            "hypercorn", n, env, timeout, lambda port: [app, "--bind", f"127.0.0.1:{port}"]
        )

    def _servers(
        self,
        server: str,
        n: int,
        env: Mapping[str, str] | None,
        timeout: float,
        args: Callable[[int], list[str]],
    ) -> list[Worker]:
        started = []
        for _ in range(n):
            port = free_port()
            log = self.tmp / f"{server}-{port}.log"
            # A session of its own: hypercorn serves from a spawned child, which
            # close() must kill too (killing the parent alone orphaned it).
            proc = subprocess.Popen(
                [sys.executable, "-m", server, *args(port)],
                env=self._env(env), cwd=ROOT,
                stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            worker = Worker(proc, port, log, own_session=True)
            self.workers.append(worker)
            started.append(worker)
        for worker in started:
            try:
                wait_port(worker.port or 0, timeout)
            except TimeoutError:
                raise TimeoutError(f"{server} did not start:\n{worker.output()}") from None
        return started

    def python(
        self,
        code: str,
        n: int = 1,
        env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
    ) -> list[Worker]:
        """Run ``code`` (a Python program) in ``n`` processes; ``sys.argv[1]`` is the index."""
        script = self.tmp / f"worker-{len(self.workers)}.py"
        script.write_text(code)
        started = []
        for i in range(n):
            log = self.tmp / f"worker-{len(self.workers)}-{i}.log"
            proc = subprocess.Popen(
                [sys.executable, str(script), str(i), *(args or [])],
                env=self._env(env), cwd=ROOT,
                stdout=log.open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            worker = Worker(proc, None, log)
            self.workers.append(worker)
            started.append(worker)
        return started

    def wait_all(self, timeout: float = 60.0) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for worker in self.workers:
            codes.append(worker.proc.wait(max(0.1, deadline - time.monotonic())))
        return codes

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
            if worker.own_session:  # a server's children (see _servers)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.pid, signal.SIGKILL)
