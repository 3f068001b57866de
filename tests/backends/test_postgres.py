"""PostgreSQL backend: migrations applied exactly once however many processes start together."""

from __future__ import annotations

import asyncpg
import pytest

from asgi_dist import Dist
from asgi_dist.backends import as_backend_unavailable
from tests.helpers.processes import ProcessGroup

STEPS = [
    "CREATE TABLE {ns}_probe (id serial PRIMARY KEY, node text NOT NULL)",
    # Not idempotent on purpose: applied twice, it would leave two rows.
    "INSERT INTO {ns}_probe (node) VALUES ('step 2')",
    "ALTER TABLE {ns}_probe ADD COLUMN extra int",
]

WORKER = """
import asyncio, os, sys
from asgi_dist import Dist
from tests.backends.test_postgres import STEPS

async def main():
    dist = Dist(postgres=os.environ["DSN"], namespace=os.environ["NS"])
    dist.runtime.postgres.register_migrations("probe", STEPS)
    # All processes wait at the same barrier so that they really start together.
    barrier = float(os.environ["START_AT"])
    loop_now = __import__("time").time()
    await asyncio.sleep(max(0.0, barrier - loop_now))
    async with dist:
        print("started", flush=True)

asyncio.run(main())
"""


async def test_eight_processes_starting_together_apply_each_step_once(
    processes: ProcessGroup, postgres_dsn: str, namespace: str
) -> None:
    import time

    env = {"DSN": postgres_dsn, "NS": namespace, "START_AT": str(time.time() + 2.0)}
    workers = processes.python(WORKER, n=8, env=env)
    codes = processes.wait_all(timeout=60)
    assert codes == [0] * 8, [w.output() for w in workers]
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval(f"SELECT count(*) FROM {namespace}_probe") == 1
        rows = await conn.fetch(
            f"SELECT capability, version FROM {namespace}_schema_migrations"
            " ORDER BY capability, version"
        )
        applied = [(r["capability"], r["version"]) for r in rows]
        assert [a for a in applied if a[0] == "probe"] == [("probe", 1), ("probe", 2), ("probe", 3)]
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1",
            f"{namespace}_probe",
        )
        assert {c["column_name"] for c in columns} == {"id", "node", "extra"}
    finally:
        await conn.close()


async def test_a_restart_applies_only_new_steps(postgres_dsn: str, namespace: str) -> None:
    dist = Dist(postgres=postgres_dsn, namespace=namespace)
    assert dist.runtime.postgres is not None
    dist.runtime.postgres.register_migrations("probe", STEPS[:2])
    async with dist:
        pass
    again = Dist(postgres=postgres_dsn, namespace=namespace)
    assert again.runtime.postgres is not None
    again.runtime.postgres.register_migrations("probe", STEPS)
    async with again:
        applied = await again.runtime.postgres.migrate()
        count = await again.runtime.postgres.fetchval(f"SELECT count(*) FROM {namespace}_probe")
    assert applied == []  # step 3 was applied by start(); migrate() again finds nothing
    assert count == 1


async def test_apps_register_their_own_migrations(postgres_dsn: str, namespace: str) -> None:
    dist = Dist(postgres=postgres_dsn, namespace=namespace)
    dist.add_migrations("shop", ["CREATE TABLE {ns}_orders (id int PRIMARY KEY)"])
    async with dist:
        assert dist.runtime.postgres is not None
        count = await dist.runtime.postgres.fetchval(f"SELECT count(*) FROM {namespace}_orders")
    assert count == 0


def test_app_migrations_need_postgres() -> None:
    from asgi_dist import ConfigError

    with pytest.raises(ConfigError, match="needs PostgreSQL"):
        Dist().add_migrations("shop", ["SELECT 1"])


def test_a_pooled_connection_left_mid_operation_counts_as_an_outage() -> None:
    # Seen while PostgreSQL restarts under a lock backend: asyncpg reports the
    # connection's broken state this way, outside its InterfaceError class.
    broken = asyncpg.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )
    outage = as_backend_unavailable(broken)
    assert outage is not None and "PostgreSQL is unavailable" in str(outage)
