"""Programs run in real OS processes by the multi-process tests.

``processes.python(WORKER, n, env, args=[role, ...])``; the
servers and the namespace come from ASGI_DIST_* variables, the role from argv.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import asyncpg

from asgi_dist import Dist
from asgi_dist.transactions import Message, Transaction
from tests.transactions.settings import FAST

WORKER = "from tests.transactions.workers import main\nmain()\n"
STATE = Path(os.environ.get("WORKER_STATE", "/tmp"))


def make_dist(**overrides: Any) -> Dist:
    from dataclasses import replace

    overrides.setdefault(
        "transactions", replace(FAST, relay_batch=int(os.environ.get("RELAY_BATCH", "500")))
    )
    overrides.setdefault("leader_ttl", 2.0)  # a killed leader is replaced quickly
    return Dist.from_env(sessions=False, **overrides)


async def record_effect(message: Message, tx: Transaction) -> None:
    """The side effect the tests count: one row per handler run that committed."""
    ns = os.environ["ASGI_DIST_NAMESPACE"]
    await tx.execute(
        f"INSERT INTO {ns}_effects (msg_id, key, n, pid) VALUES ($1, $2, $3, $4)",
        message.id,
        message.key,
        message.payload["n"],
        os.getpid(),
    )


async def relay(index: str) -> None:
    """A relay only; writes how many rows it marked published, until killed."""
    dist = make_dist()
    async with dist:
        assert dist.transactions.relay is not None
        while True:
            # Written whole and renamed: the test may read it at any moment.
            partial = STATE / f"relay-{index}.count.tmp"
            partial.write_text(str(dist.transactions.relay.relayed))
            partial.replace(STATE / f"relay-{index}.count")
            await asyncio.sleep(0.1)


async def consumer(index: str, never_ack: str = "") -> None:
    """A consumer of ``work`` in group ``g``, no relay.  ``never_ack`` makes it a process
    that commits its effects but dies (is killed) before any XACK reaches Redis."""
    from dataclasses import replace

    dist = make_dist(transactions=replace(FAST, relay=False))
    concurrency = int(os.environ.get("CONCURRENCY", "8"))
    max_deliveries = int(os.environ.get("MAX_DELIVERIES", "5"))
    dist.consumer("work", group="g", concurrency=concurrency, max_deliveries=max_deliveries)(
        record_effect
    )
    async with dist:
        if never_ack:
            client: Any = dist.runtime.require_redis("test").client

            async def no_ack(*args: Any, **kwargs: Any) -> int:
                return 0

            client.xack = no_ack
        (STATE / f"consumer-{index}.ready").write_text("1")
        await asyncio.Event().wait()  # until killed


async def stalling(index: str, seconds: str) -> None:
    """A member of group ``g`` on ``work`` (max_deliveries=1) whose handler blocks its
    event loop for ``seconds`` (CPU-bound work done synchronously) before it records its
    effect: no heartbeat leaves the process meanwhile."""
    import time
    from dataclasses import replace

    async def stall(message: Message, tx: Transaction) -> None:
        time.sleep(float(seconds))  # noqa: ASYNC251 - the stall is the point
        await record_effect(message, tx)

    dist = make_dist(transactions=replace(FAST, relay=False))
    dist.consumer("work", group="g", max_deliveries=1)(stall)
    async with dist:
        (STATE / f"stalling-{os.getpid()}.ready").write_text(dist.node_id)
        await asyncio.Event().wait()  # until killed


async def blocker(index: str, concurrency: str) -> None:
    """A member of group ``g`` on ``work`` whose handlers never finish: the entries it
    takes stay pending, heartbeated, until it is killed, or stopped by SIGTERM (a
    graceful stop, as a server's on a deploy)."""
    import signal
    from dataclasses import replace

    async def block(message: Message, tx: Transaction) -> None:
        await asyncio.sleep(120)

    dist = make_dist(transactions=replace(FAST, relay=False))
    dist.consumer("work", group="g", concurrency=int(concurrency))(block)
    async with dist:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        (STATE / f"blocker-{os.getpid()}.ready").write_text(dist.node_id)
        await stop.wait()


async def half_message(mode: str) -> None:
    """Die inside ``transactional_message``: after the local commit or before it."""
    from tests.transactions import payments

    dist = make_dist()
    async with dist:
        payments.configure(os.environ["ASGI_DIST_POSTGRES_DSN"], os.environ["ASGI_DIST_NAMESPACE"])
        async with dist.transactional_message(
            "payments.done", {"order": 1}, check=payments.check, check_after=1.0
        ) as msg:
            conn = await asyncpg.connect(os.environ["ASGI_DIST_POSTGRES_DSN"])
            tx = conn.transaction()
            await tx.start()
            await conn.execute(payments.insert_order(), 1)
            if mode == "after-commit":
                await tx.commit()
            (STATE / "inside").write_text(msg.id)
            await asyncio.sleep(60)  # killed here


async def checker(index: str) -> None:
    """Answers check-backs (payments.check); every 0.1 s writes which check-back fires it
    ran and what it resolved, until killed."""
    import json

    from tests.transactions import payments

    payments.configure(os.environ["ASGI_DIST_POSTGRES_DSN"], os.environ["ASGI_DIST_NAMESPACE"])
    dist = make_dist()
    dist.transactions.register_check(payments.check)
    async with dist:
        checkback = dist.transactions._checkback
        assert checkback is not None and dist.transactions.scheduled
        state = STATE / f"checker-{index}.json"
        for _ in range(1200):  # 2 minutes at most
            report = {
                "node": dist.node_id,
                "fires": list(dist.transactions.checkback_fires),
                "resolved": checkback.resolved,
            }
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps(report))
            tmp.replace(state)  # readers never see a half-written report
            await asyncio.sleep(0.1)


def main() -> None:
    index, role, *args = sys.argv[1:]
    if role == "relay":
        asyncio.run(relay(index))
    elif role == "consumer":
        asyncio.run(consumer(index, *args))
    elif role == "stalling":
        asyncio.run(stalling(index, *args))
    elif role == "blocker":
        asyncio.run(blocker(index, *args))
    elif role == "checker":
        asyncio.run(checker(index))
    else:
        asyncio.run(half_message(*args))


if __name__ == "__main__":
    main()
