"""The local work and the check-back function of the transactional message tests.

Module level, so that every process finds ``check`` under the same name.
"""

from __future__ import annotations

import asyncpg

from asgi_dist.transactions import CheckResult, Message

_where = {"dsn": "", "ns": ""}


def configure(dsn: str, namespace: str) -> None:
    _where.update(dsn=dsn, ns=namespace)


def insert_order() -> str:
    return f"INSERT INTO {_where['ns']}_orders (id) VALUES ($1)"


async def check(message: Message) -> CheckResult:
    """Commit the message if the order it announces was committed, else roll it back."""
    conn = await asyncpg.connect(_where["dsn"])
    try:
        found = await conn.fetchval(
            f"SELECT count(*) FROM {_where['ns']}_orders WHERE id = $1", message.payload["order"]
        )
    finally:
        await conn.close()
    return CheckResult.COMMIT if found else CheckResult.ROLLBACK
