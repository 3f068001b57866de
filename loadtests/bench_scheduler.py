"""Scheduler benchmark (not a test): lateness, failover, idle cost, duplicates vs APScheduler 3.

    python loadtests/bench_scheduler.py [--seconds 8] [--ttl 2]

Everything runs against a private redis-server on a free port (so command counts
are ours alone) with real OS processes.  Prints a Markdown table:

* fire lateness (scheduled time -> handler start) p50/p99 with 3 nodes;
* failover: SIGKILL of the leader -> first run on another node, and SIGTERM
  (graceful resign) -> first run on another node, both in ms and in leader_ttl;
* Redis commands per second caused by one idle follower;
* duplicates and unrecorded misses in each scenario, next to APScheduler 3 in
  3 processes (``pip install "apscheduler<4"``), which runs every job once per process,
  and arq cron in 3 workers (``pip install arq``; it deduplicates by job id).

Lateness and failover on a shared 2-core machine are noisy: read them as orders
of magnitude, and the duplicate counts as exact.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.servers import RedisServer  # noqa: E402

NODE = r"""
import asyncio, json, os, signal, sys, time
import redis.asyncio as aioredis
from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig
from asgi_dist.transactions import TransactionConfig

URL, NS, MODE = os.environ["URL"], os.environ["NS"], os.environ["MODE"]
PERIOD, TTL = float(os.environ["PERIOD"]), float(os.environ["TTL"])

async def main():
    client = aioredis.Redis.from_url(URL)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if MODE == "aps":
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        sched = AsyncIOScheduler()
        async def job():
            await client.rpush(NS + ":runs", json.dumps([int(time.time()), os.getpid(), 0]))
        sched.add_job(job, "interval", seconds=PERIOD)
        sched.start()
        await stop.wait()
        sched.shutdown(wait=False)
        return
    if MODE == "arq":
        from arq import cron
        from arq.connections import RedisSettings
        from arq.worker import Worker
        async def tick(ctx):
            late = time.time() * 1000 - int(ctx["job_id"].rpartition(":")[2])
            await client.rpush(NS + ":runs", json.dumps([ctx["job_id"], os.getpid(), late]))
        port = int(URL.rsplit(":", 1)[1].split("/")[0])
        worker = Worker(cron_jobs=[cron(tick, second=set(range(60)), microsecond=0)],
                        redis_settings=RedisSettings(port=port), handle_signals=False,
                        queue_name=NS + ":queue")
        task = asyncio.create_task(worker.main())
        await stop.wait()
        await worker.close()
        task.cancel()
        return
    dist = Dist(redis=URL, namespace=NS, leader_ttl=TTL, sessions=False,
                transactions=TransactionConfig(enabled=False),
                scheduler=SchedulerConfig(shutdown_grace=0.5,
                                          redeliver_after=float(os.environ.get("REDELIVER", 10))))
    if MODE == "jobs":
        @dist.every(seconds=PERIOD, misfire="run_once", misfire_grace=1.0)
        async def lat(ctx):
            late = time.time() * 1000 - ctx.fire_time.timestamp() * 1000
            await client.rpush(NS + ":runs", json.dumps([ctx.fire_id, os.getpid(), late]))
    if MODE == "any":
        @dist.every(seconds=PERIOD, run_on="any")
        async def anywhere(ctx):
            await client.rpush(NS + ":runs", json.dumps([ctx.fire_id, os.getpid(), time.time()]))
        if os.environ.get("VICTIM"):
            # Freeze on the first delivery, before the compare-and-set that starts it.
            from asgi_dist.scheduling.dispatch import Dispatcher
            start_fire, frozen = Dispatcher.start_fire, []
            async def freeze(self, job, fire_id, lease, delivery):
                if not frozen:
                    frozen.append(fire_id)
                    await client.set(NS + ":victim", json.dumps([fire_id, time.time()]))
                    os.kill(os.getpid(), signal.SIGSTOP)
                return await start_fire(self, job, fire_id, lease, delivery)
            Dispatcher.start_fire = freeze
    if MODE == "idle-dispatch":  # jobs that hand fires to followers, none due while measured
        @dist.every(hours=24, run_on="any")
        async def anywhere(ctx):
            pass
        @dist.every(hours=24, broadcast=True)
        async def everywhere(ctx):
            pass
    async with dist:
        await stop.wait()
    await client.aclose()

asyncio.run(main())
"""


class Nodes:
    def __init__(self, url: str, ns: str, tmp: Path) -> None:
        self.url, self.ns, self.tmp = url, ns, tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, mode: str, n: int, period: float, ttl: float, **extra: str
    ) -> list[subprocess.Popen[bytes]]:
        env = dict(os.environ, URL=self.url, NS=self.ns, MODE=mode, PERIOD=str(period))
        env.update(TTL=str(ttl), PYTHONPATH=str(ROOT), **extra)
        started = [
            subprocess.Popen([sys.executable, "-c", NODE], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(n)
        ]  # fmt: skip
        self.procs += started
        return started

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


async def runs(client: aioredis.Redis, ns: str) -> list[list[Any]]:
    return [json.loads(r) for r in await client.lrange(f"{ns}:runs", 0, -1)]


async def wait_runs(client: aioredis.Redis, ns: str, count: int, within: float) -> None:
    deadline = time.monotonic() + within
    while len(await runs(client, ns)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} runs after {within}s")
        await asyncio.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def duplicates(recorded: list[list[Any]]) -> int:
    return sum(n - 1 for n in Counter(r[0] for r in recorded).values() if n > 1)


async def history_misses(url: str, ns: str) -> tuple[int, int]:
    """(missed fires recorded in history, fires neither run nor recorded)."""
    from asgi_dist import Dist
    from asgi_dist.scheduling import SchedulerConfig
    from asgi_dist.transactions import TransactionConfig

    observer = Dist(redis=url, namespace=ns, sessions=False,
                    transactions=TransactionConfig(enabled=False),
                    scheduler=SchedulerConfig(enabled=False))  # fmt: skip
    async with observer:
        history = await observer.scheduler.history("lat", 10_000)
    fires = sorted(h["fire_ms"] for h in history)
    missed = sum(1 for h in history if h["status"] == "missed")
    steps = Counter(b - a for a, b in itertools.pairwise(fires))
    period = steps.most_common(1)[0][0] if steps else 0
    unrecorded = sum((b - a) // period - 1 for a, b in itertools.pairwise(fires))
    return missed, unrecorded


async def scenario_steady(url: str, tmp: Path, seconds: float, ttl: float) -> dict[str, Any]:
    ns = "bench_steady"
    client = aioredis.Redis.from_url(url)
    nodes = Nodes(url, ns, tmp)
    nodes.start("jobs", 3, 0.1, ttl)
    await wait_runs(client, ns, 5, 30)
    await client.delete(f"{ns}:runs")  # measure the steady state only
    await asyncio.sleep(seconds)
    nodes.stop_all()
    recorded = await runs(client, ns)
    late = [float(r[2]) for r in recorded]
    missed, unrecorded = await history_misses(url, ns)
    await client.aclose()
    return {
        "fires": len(recorded),
        "p50": statistics.median(late),
        "p99": pct(late, 0.99),
        "dups": duplicates(recorded),
        "missed": missed,
        "unrecorded": unrecorded,
    }


async def scenario_failover(url: str, tmp: Path, ttl: float, graceful: bool) -> dict[str, Any]:
    ns = "bench_graceful" if graceful else "bench_kill"
    client = aioredis.Redis.from_url(url)
    nodes = Nodes(url, ns, tmp)
    procs = {p.pid: p for p in nodes.start("jobs", 3, 0.05, ttl)}
    await wait_runs(client, ns, 10, 30)
    await asyncio.sleep(0.5)
    leader = int((await runs(client, ns))[-1][1])
    seen = len(await runs(client, ns))
    t0 = time.monotonic()
    if graceful:
        procs[leader].terminate()
    else:
        procs[leader].kill()
    took = None
    deadline = t0 + 30
    while time.monotonic() < deadline:
        fresh = (await runs(client, ns))[seen:]
        if any(int(r[1]) != leader for r in fresh):
            took = time.monotonic() - t0
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(1.0)
    nodes.stop_all()
    recorded = await runs(client, ns)
    missed, unrecorded = await history_misses(url, ns)
    await client.aclose()
    return {"failover": took, "dups": duplicates(recorded), "missed": missed,
            "unrecorded": unrecorded}  # fmt: skip


async def scenario_redeliver(url: str, tmp: Path, ttl: float, after: float) -> dict[str, Any]:
    """run_on="any": a node freezes (SIGSTOP) holding a delivered fire before starting it;
    how long until another node runs it, and does any fire run twice when it wakes?"""
    from asgi_dist import Dist
    from asgi_dist.scheduling import SchedulerConfig
    from asgi_dist.transactions import TransactionConfig

    ns = "bench_redeliver"
    client = aioredis.Redis.from_url(url)
    nodes = Nodes(url, ns, tmp)
    nodes.start("any", 2, 0.2, ttl, REDELIVER=str(after))
    await wait_runs(client, ns, 5, 30)
    (victim,) = nodes.start("any", 1, 0.2, ttl, REDELIVER=str(after), VICTIM="1")
    deadline = time.monotonic() + 30
    while not await client.exists(f"{ns}:victim"):
        if time.monotonic() > deadline:
            raise TimeoutError("the victim received no fire")
        await asyncio.sleep(0.02)
    fire_id, frozen_at = json.loads(await client.get(f"{ns}:victim"))
    ran_at = None
    while ran_at is None and time.monotonic() < deadline + 30:
        ran_at = next((r[2] for r in await runs(client, ns) if r[0] == fire_id), None)
        await asyncio.sleep(0.02)
    victim.send_signal(signal.SIGCONT)  # it wakes and loses the compare-and-set
    await asyncio.sleep(1.5)
    nodes.stop_all()
    recorded = await runs(client, ns)
    observer = Dist(redis=url, namespace=ns, sessions=False,
                    transactions=TransactionConfig(enabled=False),
                    scheduler=SchedulerConfig(enabled=False))  # fmt: skip
    async with observer:
        record = await observer.scheduler.store.record("anywhere", fire_id)
    await client.aclose()
    return {
        "took": None if ran_at is None else ran_at - frozen_at,
        "delivery": None if record is None else record.get("delivery"),
        "status": None if record is None else record.get("status"),
        "runs": len(recorded),
        "dups": duplicates(recorded),
    }


async def scenario_idle(url: str, tmp: Path, ttl: float, seconds: float, mode: str) -> Counter[str]:
    """Redis commands per second caused by one idle follower, per command (``total`` for
    all; commands run inside Lua scripts count too, as Redis counts them)."""
    ns = "bench_" + mode.replace("-", "_")
    client = aioredis.Redis.from_url(url)
    nodes = Nodes(url, ns, tmp)

    async def calls() -> Counter[str]:
        stats = await client.info("commandstats")
        counted = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})
        counted["total"] = sum(counted.values())
        return counted

    async def rate() -> Counter[str]:
        before = await calls()
        await asyncio.sleep(seconds)
        after = await calls()
        after.subtract(before)
        after["info"] -= 1  # our own INFO
        after["total"] -= 1
        return after

    nodes.start(mode, 1, 1.0, ttl)
    await asyncio.sleep(3)
    one = await rate()
    nodes.start(mode, 2, 1.0, ttl)
    await asyncio.sleep(3)
    three = await rate()
    nodes.stop_all()
    await client.aclose()
    three.subtract(one)
    return Counter({k: v / 2 / seconds for k, v in three.items() if v})


async def scenario_apscheduler(url: str, tmp: Path, seconds: float) -> dict[str, Any] | None:
    try:
        import apscheduler  # noqa: F401
    except ImportError:
        return None
    ns = "bench_aps"
    client = aioredis.Redis.from_url(url)
    nodes = Nodes(url, ns, tmp)
    nodes.start("aps", 3, 1.0, 2.0)
    await wait_runs(client, ns, 3, 30)
    await asyncio.sleep(seconds)
    nodes.stop_all()
    recorded = await runs(client, ns)
    per_second = Counter(r[0] for r in recorded)
    await client.aclose()
    return {"fires": len(per_second), "runs": len(recorded), "dups": duplicates(recorded)}


async def scenario_arq(url: str, tmp: Path, seconds: float) -> dict[str, Any] | None:
    try:
        import arq  # noqa: F401
    except ImportError:
        return None
    ns = "bench_arq"
    client = aioredis.Redis.from_url(url)
    nodes = Nodes(url, ns, tmp)
    nodes.start("arq", 3, 1.0, 2.0)
    await wait_runs(client, ns, 2, 30)
    await client.delete(f"{ns}:runs")
    await asyncio.sleep(seconds)
    nodes.stop_all()
    recorded = await runs(client, ns)
    late = [float(r[2]) for r in recorded]
    await client.aclose()
    return {
        "fires": len({r[0] for r in recorded}),
        "runs": len(recorded),
        "dups": duplicates(recorded),
        "p50": statistics.median(late) if late else float("nan"),
        "p99": pct(late, 0.99) if late else float("nan"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--ttl", type=float, default=2.0)
    args = parser.parse_args()
    server = RedisServer().start()
    tmp = Path(server.dir)
    try:
        # Round trip baseline for the ratios.
        client = aioredis.Redis.from_url(server.url)
        t0 = time.perf_counter()
        for _ in range(200):
            await client.ping()
        rtt_ms = (time.perf_counter() - t0) / 200 * 1000
        await client.aclose()
        steady = await scenario_steady(server.url, tmp, args.seconds, args.ttl)
        kill = await scenario_failover(server.url, tmp, args.ttl, graceful=False)
        graceful = await scenario_failover(server.url, tmp, args.ttl, graceful=True)
        redeliver = await scenario_redeliver(server.url, tmp, args.ttl, 1.0)
        idle = await scenario_idle(server.url, tmp, args.ttl, args.seconds, "idle")
        idle_dispatch = await scenario_idle(
            server.url, tmp, args.ttl, args.seconds, "idle-dispatch"
        )
        aps = await scenario_apscheduler(server.url, tmp, min(args.seconds, 5.0))
        arq_result = await scenario_arq(server.url, tmp, args.seconds)
    finally:
        server.close()

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x * 1000:.0f} ms ({x / args.ttl:.2f} x ttl)"

    print(f"\nRedis round trip {rtt_ms:.3f} ms; leader_ttl {args.ttl:g} s; 3 nodes\n")
    print("| scenario | result | duplicates | missed (in history) | unrecorded misses |")
    print("|---|---|---|---|---|")
    print(
        f"| steady, every 0.1 s, {steady['fires']} fires | lateness p50 "
        f"{steady['p50']:.1f} ms ({steady['p50'] / rtt_ms:.0f} x RTT), p99 {steady['p99']:.1f} ms"
        f" | {steady['dups']} | {steady['missed']} | {steady['unrecorded']} |"
    )
    print(
        f"| SIGKILL the leader | failover {ms(kill['failover'])} | {kill['dups']} "
        f"| {kill['missed']} | {kill['unrecorded']} |"
    )
    print(
        f"| SIGTERM the leader (resign) | hand-over {ms(graceful['failover'])} "
        f"| {graceful['dups']} | {graceful['missed']} | {graceful['unrecorded']} |"
    )
    print(
        f"| run_on='any', a node freezes holding a fire (redeliver_after 1 s) | run on another "
        f"node {redeliver['took'] * 1000:.0f} ms after the freeze ({redeliver['status']}, delivery "
        f"{redeliver['delivery']}); {redeliver['runs']} runs | {redeliver['dups']} | - | - |"
    )
    for label, counted in (
        ("idle follower", idle),
        ("idle follower with run_on='any' and broadcast jobs", idle_dispatch),
    ):
        detail = ", ".join(
            f"{name} {value:.2f}"
            for name, value in counted.most_common()
            if name != "total" and value >= 0.01
        )
        print(f"| {label} | {counted['total']:.2f} Redis commands/s ({detail}) | - | - | - |")
    if aps is None:
        print("| APScheduler 3, 3 processes | not installed (pip install 'apscheduler<4') |")
    else:
        ratio = aps["runs"] / max(1, aps["fires"])
        print(
            f"| APScheduler 3, 3 processes, every 1 s | {aps['runs']} runs for {aps['fires']} "
            f"fires ({ratio:.1f} x) | {aps['dups']} | - | - |"
        )
    if arq_result is None:
        print("| arq cron, 3 workers | not installed (pip install arq) | | | |")
    else:
        print(
            f"| arq cron, 3 workers, every 1 s | {arq_result['runs']} runs for "
            f"{arq_result['fires']} fires, lateness p50 {arq_result['p50']:.1f} ms, p99 "
            f"{arq_result['p99']:.1f} ms | {arq_result['dups']} | - | - |"
        )


if __name__ == "__main__":
    asyncio.run(main())
