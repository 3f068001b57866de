"""Session test fixtures: an app per Dist, an HTTP client on it, a round-trip counter,
and a private PostgreSQL cluster the outage tests may stop and restart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig
from asgi_dist.sessions import SessionConfig
from tests.helpers.servers import free_port, wait_port
from tests.sessions.app import build

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class CountingRedis(aioredis.Redis):
    """A real client that counts the commands it sends (each is one round trip here:
    the session code sends no pipelines)."""

    round_trips = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        return await super().execute_command(*args, **options)


@pytest.fixture
async def counting_redis(redis_url: str) -> AsyncIterator[CountingRedis]:
    client = CountingRedis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def session_dist(make_dist: Callable[..., Any]) -> Callable[..., Any]:
    """``await session_dist(backend, **session_options, **dist_overrides)``."""

    async def factory(backend: str = "redis", **options: Any) -> Dist:
        dist_keys = {"redis", "postgres", "secret_keys", "namespace", "start", "scheduler"}
        overrides = {k: options.pop(k) for k in list(options) if k in dist_keys}
        if backend == "memory":
            overrides.setdefault("redis", None)
            overrides.setdefault("postgres", None)
        # These tests need no scheduler: keep its leader campaign out of them.
        overrides.setdefault("scheduler", SchedulerConfig(enabled=False))
        config = SessionConfig(backend=backend, **options)  # type: ignore[arg-type]
        dist: Dist = await make_dist(sessions=config, **overrides)
        return dist

    return factory


def client(dist: Dist, base_url: str = "http://testserver") -> httpx.AsyncClient:
    """An HTTP client on the session test app of ``dist`` (already started)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build(dist)), base_url=base_url)


def set_cookie(response: httpx.Response) -> str | None:
    values = response.headers.get_list("set-cookie")
    assert len(values) <= 1, values
    return values[0] if values else None


class PostgresServer:
    """A private PostgreSQL cluster (initdb in a temp dir, trust auth, a free loopback port),
    run as the ``postgres`` user: ``stop()`` and ``start()`` it; the shared server is never
    touched."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"asgi-dist-pg-{self.port}-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(
            PG_BIN / "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "--no-instructions",
        )  # fmt: skip

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str | Path, timeout: float = 60) -> None:
        command = ["runuser", "-u", "postgres", "--", *(str(a) for a in args)]
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            output = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"{command[4:6]} failed ({done.returncode}): {output}\n{tail}")

    def start(self) -> PostgresServer:
        # The socket directory is ours too: nothing shared under /var/run/postgresql.
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -k {self.dir} "
            "-c fsync=off -c shared_buffers=16MB -c max_connections=30"
        )
        self._as_postgres(
            PG_BIN / "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", "30", "start",
        )  # fmt: skip
        wait_port(self.port, 10)
        return self

    def stop(self) -> None:
        """A fast shutdown: every connection is terminated, new ones are refused."""
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(PG_BIN / "pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _pids(self) -> list[int]:
        """The postmaster and its children (the backends holding our connections)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def pause(self) -> None:
        """SIGSTOP every process of the cluster: connections stay open, nothing answers."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)
        self.paused = False

    paused = False

    def close(self) -> None:
        if self.paused:
            self.resume()
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL this test may stop and restart."""
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip(f"needs PostgreSQL 15 binaries in {PG_BIN} and runuser")
    if os.geteuid() != 0:
        pytest.skip("needs root to run the private PostgreSQL as the postgres user")
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.close()
