"""The PostgreSQL backends behind PgBouncer in transaction pooling mode, on a plain DSN.

Every lease operation is one statement with no session state, so it must work
when consecutive statements of one client run on different server connections.
Skipped (with the reason) when pgbouncer is not installed: ``apt-get install pgbouncer``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dist import SessionConfig, get_session, get_tx
from asgi_dist.backends.postgres import _shares_server_connections
from asgi_dist.backends.redis import create_redis_client
from tests.helpers.processes import ProcessGroup
from tests.helpers.servers import free_port, wait_port

# Debian installs it in /usr/sbin, which is not on every user's PATH.
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

pytestmark = pytest.mark.skipif(
    not os.path.exists(PGBOUNCER), reason="pgbouncer is not installed (apt-get install pgbouncer)"
)


@pytest.fixture
def bouncer_dsn(postgres_dsn: str) -> Iterator[str]:
    """A private PgBouncer in transaction pooling mode in front of the test database.

    Two server connections: every client's statements interleave on them, so any
    session state (a prepared statement, a setting) a lease relied on would leak
    between clients or go missing.
    """
    parts = urlsplit(postgres_dsn)
    workdir = Path(tempfile.mkdtemp(prefix="asgi-dist-pgbouncer-"))
    os.chmod(workdir, 0o777)  # pgbouncer drops root privileges to 'nobody'
    port = free_port()
    user = parts.username or "postgres"
    (workdir / "users.txt").write_text(f'"{user}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={parts.hostname} port={parts.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 2\nmax_client_conn = 200\n"
        f"logfile = {workdir / 'pgbouncer.log'}\n"
    )
    # pgbouncer refuses to run as root unless told whom to become.
    as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(
        [PGBOUNCER, *as_user, str(workdir / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 10)
        yield f"postgresql://{user}@127.0.0.1:{port}{parts.path}"
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


# A plain DSN: the Dist finds out at start that it is behind a transaction pooler.
WORKER = """
import asyncio, os, sys
from asgi_dist import Dist
from asgi_dist.backends.redis import create_redis_client
from asgi_dist.scheduling import SchedulerConfig

async def main():
    ns = os.environ["NS"]
    log = create_redis_client(os.environ["REDIS"])
    async with Dist(postgres=os.environ["BOUNCER"], namespace=ns, sessions=False,
                    scheduler=SchedulerConfig(enabled=False)) as dist:
        lock = dist.lock("counter", ttl=10, backend="postgres")
        for _ in range(25):
            async with lock as held:
                value = int(await log.get("{%s}:value" % ns) or 0)
                await asyncio.sleep(0)
                await log.set("{%s}:value" % ns, value + 1)
                await log.rpush("{%s}:fences" % ns, held.fence)
    await log.aclose()

asyncio.run(main())
"""


async def test_four_processes_never_hold_the_postgres_lock_together_behind_pgbouncer(
    make_dist, processes: ProcessGroup, bouncer_dsn: str, redis_url: str, namespace: str
) -> None:
    env = {"NS": namespace, "REDIS": redis_url, "BOUNCER": bouncer_dsn}
    workers = processes.python(WORKER, n=4, env=env)
    codes = await asyncio.to_thread(processes.wait_all, 90)
    assert codes == [0] * 4, "\n".join(w.output() for w in workers)
    log = create_redis_client(redis_url)
    try:
        value = int(await log.get(f"{{{namespace}}}:value"))
        fences = [int(x) for x in await log.lrange(f"{{{namespace}}}:fences", 0, -1)]
    finally:
        await log.aclose()
    assert value == 100, "increments were lost: two processes held the lock together"
    assert fences == sorted(fences) and len(set(fences)) == 100


async def test_the_start_probe_tells_a_transaction_pooler_from_a_direct_connection(
    bouncer_dsn: str, postgres_dsn: str
) -> None:
    for dsn, pooled in ((postgres_dsn, False), (bouncer_dsn, True)):
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            assert await _shares_server_connections(pool) is pooled, dsn
        finally:
            pool.terminate()


async def test_sessions_and_request_transactions_work_behind_pgbouncer_on_a_plain_dsn(
    make_dist, bouncer_dsn: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Statements of one client move between server connections: nothing may break."""
    dist = await make_dist(
        redis=None, postgres=bouncer_dsn, sessions=SessionConfig(backend="postgres")
    )
    assert "behind a pooler in transaction mode" in caplog.text

    async def visit(request: Request) -> JSONResponse:
        session = get_session()
        session["visits"] = session.get("visits", 0) + 1
        tx = get_tx()
        await tx.execute(f"INSERT INTO {namespace}_visits VALUES ($1)", session["visits"])
        await tx.publish("visited", {"n": session["visits"]})
        return JSONResponse({"visits": session["visits"]})

    await dist.runtime.postgres.pool.execute(f"CREATE TABLE {namespace}_visits (n int)")
    app = dist.wrap(Starlette(routes=[Route("/", visit)]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
        for expected in range(1, 31):
            response = await client.get("/")
            assert response.status_code == 200, response.text
            assert response.json() == {"visits": expected}
    pool = dist.runtime.postgres.pool
    assert await pool.fetchval(f"SELECT count(*) FROM {namespace}_visits") == 30
    assert await pool.fetchval(f"SELECT count(*) FROM {namespace}_outbox") == 30
