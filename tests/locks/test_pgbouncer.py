"""The PostgreSQL lock behind PgBouncer in transaction pooling mode.

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

import pytest

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

    One server connection: every client's statements interleave on it, so any
    session state a lease relied on would leak between processes.  (More would
    also work for the leases, but Dist.start's migration check takes a session
    advisory lock that transaction pooling can strand on another connection.)
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
        "pool_mode = transaction\ndefault_pool_size = 1\nmax_client_conn = 200\n"
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


# Pools for PgBouncer's transaction mode (1.18) must not cache prepared statements.
WORKER = """
import asyncio, os, sys
import asyncpg
from asgi_dist import Dist
from asgi_dist.backends.redis import create_redis_client
from asgi_dist.scheduling import SchedulerConfig

async def main():
    ns = os.environ["NS"]
    log = create_redis_client(os.environ["REDIS"])
    pool = await asyncpg.create_pool(os.environ["BOUNCER"], statement_cache_size=0,
                                     min_size=1, max_size=3)
    async with Dist(postgres=pool, namespace=ns, sessions=False,
                    scheduler=SchedulerConfig(enabled=False)) as dist:
        lock = dist.lock("counter", ttl=10, backend="postgres")
        for _ in range(25):
            async with lock as held:
                value = int(await log.get("{%s}:value" % ns) or 0)
                await asyncio.sleep(0)
                await log.set("{%s}:value" % ns, value + 1)
                await log.rpush("{%s}:fences" % ns, held.fence)
    await pool.close()
    await log.aclose()

asyncio.run(main())
"""


async def test_four_processes_never_hold_the_postgres_lock_together_behind_pgbouncer(
    make_dist, processes: ProcessGroup, bouncer_dsn: str, redis_url: str, namespace: str
) -> None:
    # Create the lease table directly (migrations take a session advisory lock).
    await make_dist(redis=None, sessions=False)
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
