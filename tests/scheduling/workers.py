"""A scheduler node for the multi-process tests: ``python -c 'from ... import main; main()'``.

Every run appends ``{fire_id, job, pid, fence}`` to the Redis list ``<namespace>:runs``,
so the test can prove each fire ran exactly once across processes.

``JOBS=broadcast`` runs one broadcast job every second; with ``VICTIM=kill`` this
node's first shard confesses (``<namespace>:victim``) and hangs, with
``VICTIM=freeze`` it freezes the node (SIGSTOP) and succeeds once woken.

``JOBS=redeliver`` runs one ``run_on="any"`` job (``RUN_ON=leader``: a leader job;
``RETRIES=n``: n retries); with ``VICTIM=receive`` this node freezes itself (SIGSTOP)
on its first delivery, before the compare-and-set that starts the fire, with
``VICTIM=run`` its first run hangs, and with ``VICTIM=freeze`` its first run freezes
the node and, once woken, fails (so a retry would be due); either way it first
writes ``{fire_id, node, pid}`` to ``<namespace>:victim`` for the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import redis.asyncio as aioredis

from asgi_dist import Dist
from asgi_dist.scheduling import JobContext, SchedulerConfig
from asgi_dist.scheduling.dispatch import Dispatcher
from asgi_dist.transactions import TransactionConfig


def build(url: str, namespace: str) -> tuple[Dist, aioredis.Redis]:
    postgres = os.environ.get("POSTGRES_DSN")  # set: the scheduler runs on PostgreSQL alone
    scheduler = SchedulerConfig(
        shutdown_grace=1.0,
        redeliver_after=float(os.environ.get("REDELIVER_AFTER", "10")),
        running_lease=float(os.environ.get("RUNNING_LEASE", "30")),
    )
    dist = Dist(
        redis=None if postgres else url,
        postgres=postgres,
        namespace=namespace,
        leader_ttl=float(os.environ.get("LEADER_TTL", "2")),
        sessions=False,
        transactions=TransactionConfig(enabled=False),
        scheduler=scheduler,
    )
    client = aioredis.Redis.from_url(url)
    runs = f"{namespace}:runs"

    async def record(ctx: JobContext) -> None:
        entry = {"fire_id": ctx.fire_id, "job": ctx.job, "pid": os.getpid(), "fence": ctx.fence}
        entry["attempt"] = ctx.attempt
        await client.rpush(runs, json.dumps(entry))

    if os.environ.get("JOBS") == "dispatch":

        @dist.every(seconds=1, broadcast=True)
        async def everywhere(ctx: JobContext) -> None:
            entry = {
                "fire_id": ctx.fire_id,
                "job": ctx.job,
                "pid": os.getpid(),
                "shard": [ctx.shard_index, ctx.shard_total],
            }
            await client.rpush(runs, json.dumps(entry))

        @dist.every(seconds=0.25, run_on="any")
        async def anywhere(ctx: JobContext) -> None:
            await record(ctx)

        return dist, client

    if os.environ.get("JOBS") == "broadcast":
        victim = os.environ.get("VICTIM", "")
        hooked: list[str] = []

        @dist.every(seconds=1, broadcast=True)
        async def fanout(ctx: JobContext) -> None:
            entry = {"fire_id": ctx.fire_id, "job": ctx.job, "pid": os.getpid()}
            entry["shard"] = [ctx.shard_index, ctx.shard_total]
            await client.rpush(runs, json.dumps(entry))
            if victim and not hooked:
                hooked.append(ctx.fire_id)
                confession = {"fire_id": ctx.fire_id, "node": dist.runtime.node_id}
                confession.update(pid=os.getpid(), shard=ctx.shard_index)
                await client.set(f"{namespace}:victim", json.dumps(confession))
                if victim == "freeze":
                    os.kill(os.getpid(), signal.SIGSTOP)  # frozen mid-shard; then succeeds
                else:
                    await asyncio.sleep(60)  # the test SIGKILLs this node mid-shard

        return dist, client

    if os.environ.get("JOBS") == "redeliver":
        victim = os.environ.get("VICTIM", "")
        hooked: list[str] = []

        async def confess(fire_id: str) -> None:
            entry = {"fire_id": fire_id, "node": dist.runtime.node_id, "pid": os.getpid()}
            await client.set(f"{namespace}:victim", json.dumps(entry))

        run_on: Any = os.environ.get("RUN_ON", "any")

        retries = int(os.environ.get("RETRIES", "0"))

        @dist.every(seconds=0.5, run_on=run_on, retries=retries)
        async def anywhere(ctx: JobContext) -> None:
            await record(ctx)
            if victim == "run" and not hooked:
                hooked.append(ctx.fire_id)
                await confess(ctx.fire_id)
                await asyncio.sleep(60)  # the test SIGKILLs this node mid-run
            if victim == "freeze" and not hooked:
                hooked.append(ctx.fire_id)
                await confess(ctx.fire_id)
                os.kill(os.getpid(), signal.SIGSTOP)  # frozen mid-run until the test wakes it
                raise RuntimeError("woken past the run lease: no retry of this fire may start")

        if victim == "receive":
            start_fire = Dispatcher.start_fire

            async def freeze_first(
                self: Dispatcher, job: str, fire_id: str, lease: int, delivery: int
            ) -> str:
                if not hooked:
                    hooked.append(fire_id)
                    await confess(fire_id)
                    os.kill(os.getpid(), signal.SIGSTOP)  # received, not yet started
                return await start_fire(self, job, fire_id, lease, delivery)

            Dispatcher.start_fire = freeze_first  # type: ignore[method-assign]

        return dist, client

    @dist.every(seconds=1, misfire="run_once", misfire_grace=1.0)
    async def tick(ctx: JobContext) -> None:
        await record(ctx)

    @dist.cron("*/1 * * * * *", misfire="skip", misfire_grace=1.0)  # 6 fields: seconds first
    async def crontick(ctx: JobContext) -> None:
        await record(ctx)

    return dist, client


async def hang_once(ctx: JobContext) -> None:
    """A one-off (``at()``) that confesses like a victim, then hangs (until SIGKILLed)."""
    client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
    confession = {"fire_id": ctx.fire_id, "node": ctx.node_id, "pid": os.getpid()}
    await client.set(f"{os.environ['NAMESPACE']}:victim", json.dumps(confession))
    await client.aclose()
    await asyncio.sleep(60)


async def serve() -> None:
    dist, client = build(os.environ["REDIS_URL"], os.environ["NAMESPACE"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with dist:
        print("ready", os.getpid(), flush=True)
        await stop.wait()
    await client.aclose()


def main() -> None:
    asyncio.run(serve())
