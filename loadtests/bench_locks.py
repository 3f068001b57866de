"""Lock benchmark: asgi_dist vs redis-py's asyncio Lock, same run, same Redis.

    python loadtests/bench_locks.py [--seconds 2] [--redis redis://...] [--loop uvloop]

Without ``--redis`` it starts a private redis-server on a free port, so that
command counts are ours alone and nobody else's traffic skews the numbers.
Prints Markdown tables: PING round trip; uncontended acquire+release; contended
hand-off latency (release -> next holder's acquire returns) p50/p99 and
throughput with 2, 8 and 32 contending tasks and with 2, 8 and 32 processes; fairness
spread; Redis commands per second per waiting client.  Every number is also
given as a ratio to the PING round trip or to the peer.

Further peers, for comparison only (not dependencies of asgi_dist):

    pip install pottery python-redis-lock

pottery's ``AIORedlock`` (its asyncio API, one Redis master) runs as tasks like
ours; python-redis-lock has no asyncio API, so its contenders are OS threads
of this process, each with its own ``redis_lock.Lock`` on a shared sync client.
A peer that is not importable is skipped with the reason printed.

``--loop uvloop`` (``pip install uvloop``) runs this process and every process
contender on uvloop, the loop uvicorn picks when it is installed
(``uvicorn[standard]``); every lock, ours and the peers', runs on the same loop.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.connection
from redis.asyncio.connection import Connection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asgi_dist import Dist  # noqa: E402
from asgi_dist.scheduling import SchedulerConfig  # noqa: E402

Acquire = Callable[[], Coroutine[Any, Any, Callable[[], Awaitable[None]]]]

# Round trips counted on the client: every command or pipeline a connection
# sends (Lua scripts count once, however many commands they run inside).
SENT = {"n": 0}
_send = Connection.send_packed_command


async def _counting_send(self: Connection, *args: Any, **kwargs: Any) -> None:
    SENT["n"] += 1
    await _send(self, *args, **kwargs)


Connection.send_packed_command = _counting_send  # type: ignore[method-assign,assignment]

# The same count for the sync client python-redis-lock uses (threads: the GIL
# makes the increment good enough for a count of round trips).
_sync_send = redis.connection.Connection.send_packed_command


def _counting_sync_send(self: redis.connection.Connection, *args: Any, **kwargs: Any) -> None:
    SENT["n"] += 1
    _sync_send(self, *args, **kwargs)  # type: ignore[no-untyped-call]


redis.connection.Connection.send_packed_command = _counting_sync_send  # type: ignore[method-assign,assignment]

# asgi_dist sends its lock scripts over its multiplexed connection, which counts itself.
MULTIPLEXED: list[Any] = []


def sent() -> int:
    """Round trips sent so far by every client of this process."""
    return SENT["n"] + sum(m.commands_sent for m in MULTIPLEXED)


def optional_peer(module: str) -> tuple[Any, str]:
    """The peer's module, or None and the reason it is skipped."""
    try:
        return importlib.import_module(module), ""
    except ImportError as exc:
        return None, f"{module} not importable ({exc}); pip install pottery python-redis-lock"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_private_redis() -> tuple[str, subprocess.Popen[bytes], str]:
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="asgi-dist-bench-")
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc, workdir


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- contenders -----------------------------------------------------------------


def asgi_dist_acquirer(dist: Dist, name: str) -> Acquire:
    async def acquire() -> Callable[[], Awaitable[None]]:
        held = await dist.lock(name, ttl=30).acquire()
        return held.release

    return acquire


def redis_py_acquirer(client: aioredis.Redis, name: str, sleep: float) -> Acquire:
    async def acquire() -> Callable[[], Awaitable[None]]:
        # One Lock object per acquisition: redis-py keeps the token on the
        # object (thread-local), which tasks of one loop would otherwise share.
        lock = client.lock(name, timeout=30, sleep=sleep)
        await lock.acquire()
        return lock.release

    return acquire


def pottery_acquirer(pottery: Any, client: aioredis.Redis, name: str) -> Acquire:
    async def acquire() -> Callable[[], Awaitable[None]]:
        # One AIORedlock per acquisition: it keeps its token on the object.
        lock = pottery.AIORedlock(key=name, masters={client}, auto_release_time=30)
        await lock.acquire()
        return lock.release  # type: ignore[no-any-return]

    return acquire


SyncAcquire = Callable[[], Callable[[], None]]


def redis_lock_acquirer(redis_lock: Any, client: redis.Redis, name: str) -> SyncAcquire:
    def acquire() -> Callable[[], None]:
        lock = redis_lock.Lock(client, name, expire=30)
        lock.acquire()
        return lock.release  # type: ignore[no-any-return]

    return acquire


@dataclass
class Contention:
    handoffs: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    per_task: list[int] = field(default_factory=list)
    acquisitions: int = 0
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return self.acquisitions / self.seconds if self.seconds else 0.0


async def contend(make: Callable[[int], Acquire], tasks: int, seconds: float) -> Contention:
    """``tasks`` contenders loop acquire -> release for ``seconds``."""
    result = Contention(per_task=[0] * tasks)
    state: dict[str, Any] = {"released_at": None, "by": None}
    stop_at = time.perf_counter() + seconds

    async def contender(i: int) -> None:
        acquire = make(i)
        while time.perf_counter() < stop_at:
            asked = time.perf_counter()
            release = await acquire()
            now = time.perf_counter()
            result.waits.append(now - asked)
            if state["released_at"] is not None and state["by"] != i:
                result.handoffs.append(now - state["released_at"])
            result.per_task[i] += 1
            result.acquisitions += 1
            state["by"] = i
            state["released_at"] = time.perf_counter()
            await release()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(contender(i) for i in range(tasks))), seconds + 60)
    result.seconds = time.perf_counter() - started
    return result


def contend_threads(make: Callable[[int], SyncAcquire], threads: int, seconds: float) -> Contention:
    """``contend`` for a sync lock: ``threads`` OS threads loop acquire -> release."""
    result = Contention(per_task=[0] * threads)
    state: dict[str, Any] = {"released_at": None, "by": None}
    stop_at = time.perf_counter() + seconds
    # Only the holder writes ``state`` and the counters, as in ``contend``; the
    # list appends are atomic under the GIL.

    def contender(i: int) -> None:
        acquire = make(i)
        while time.perf_counter() < stop_at:
            asked = time.perf_counter()
            release = acquire()
            now = time.perf_counter()
            result.waits.append(now - asked)
            if state["released_at"] is not None and state["by"] != i:
                result.handoffs.append(now - state["released_at"])
            result.per_task[i] += 1
            result.acquisitions += 1
            state["by"] = i
            state["released_at"] = time.perf_counter()
            release()

    started = time.perf_counter()
    workers = [threading.Thread(target=contender, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 60)
    result.seconds = time.perf_counter() - started
    return result


def uncontended_sync(acquire: SyncAcquire, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        release = acquire()
        release()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def uncontended(acquire: Acquire, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        release = await acquire()
        await release()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def commands_while_waiting(
    admin: aioredis.Redis, hold: Callable[[], Awaitable[Any]], waiters: list[Acquire]
) -> float:
    """Redis commands per second per waiting contender while a holder keeps the lock."""
    release = await hold()
    tasks = [asyncio.create_task(w()) for w in waiters]
    await asyncio.sleep(0.3)
    before = sent()
    await asyncio.sleep(1.0)
    after = sent()
    await release()
    for next_done in asyncio.as_completed(tasks, timeout=60):
        await (await next_done)()
    return (after - before) / len(waiters)


# --- processes -------------------------------------------------------------------

PROCESS = """
import asyncio, mmap, os, struct, sys, time
sys.path.insert(0, os.environ["ROOT"])
import redis.asyncio as aioredis
from asgi_dist import Dist
from asgi_dist.scheduling import SchedulerConfig

# The last release (pid, time) lives in a file every contender maps: written by
# the holder only, under the lock, so the critical section holds no Redis command
# of the benchmark's own (which would dwarf the lock's and favour pollers).
LAST = struct.Struct("qd")

async def main():
    url, kind, name = os.environ["URL"], os.environ["KIND"], os.environ["NAME"]
    with open(os.environ["LAST"], "r+b") as f:
        last = mmap.mmap(f.fileno(), LAST.size)
    log = aioredis.Redis.from_url(url)
    dist = Dist(redis=url, namespace="bench", sessions=False,
                scheduler=SchedulerConfig(enabled=False))
    rows, pid = [], os.getpid()
    async with dist:
        # Start together: the parent sets the stop time once everyone is ready.
        await log.incr(name + ":ready")
        while (go := await log.get(name + ":go")) is None:
            await asyncio.sleep(0.01)
        stop_at = float(go)
        while time.time() < stop_at:
            asked = time.time()
            if kind.startswith("asgi_dist"):
                held = await dist.lock(name, ttl=30, fair=kind == "asgi_dist_fair").acquire()
                release = held.release
            else:
                lock = log.lock(name, timeout=30, sleep=float(kind.split("=")[1]))
                await lock.acquire()
                release = lock.release
            got = time.time()
            prev_pid, prev_at = LAST.unpack(last[:LAST.size])
            rows.append("%d %f %d %f %f" % (pid, got, prev_pid, prev_at, got - asked))
            last[:LAST.size] = LAST.pack(pid, time.time())
            await release()
        # Tear down together: a process that exits (closing connections, writing
        # its rows) while others still hand the lock on would skew their tail.
        await log.incr(name + ":done")
        for _ in range(6000):
            if int(await log.get(name + ":done")) >= int(os.environ["PROCS"]):
                break
            await asyncio.sleep(0.01)
        if rows:
            await log.rpush(name + ":handoffs", *rows)
        await log.incrby(name + ":count", len(rows))
    await log.aclose()

if os.environ.get("LOOP") == "uvloop":
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
asyncio.run(main())
"""


# The machine's floor for a cross-process hand-off: one process PUBLISHes, another
# that sleeps in recv() on its subscription answers with a PUBLISH of its own.
# Plain blocking sockets, no asyncio and no lock: what is left is Redis, the
# loopback and the OS waking a process.
FLOOR = """
import os, socket, sys, time
def conn():
    s = socket.create_connection(("127.0.0.1", int(os.environ["PORT"])))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
def cmd(*a):
    return ("*%d\\r\\n" % len(a) + "".join("$%d\\r\\n%s\\r\\n" % (len(x), x) for x in a)).encode()
name = os.environ["NAME"]
sub, pub = conn(), conn()
sub.sendall(cmd("SUBSCRIBE", name + ":b")); sub.recv(1000)
pub.sendall(cmd("SET", name + ":ready", "1")); pub.recv(100)
while b"stop" not in sub.recv(1000):
    pub.sendall(cmd("PUBLISH", name + ":a", "x")); pub.recv(100)
"""


# The floor with N processes: a token goes round a ring of N processes, each
# PUBLISHing it to the next one's channel when its own subscription delivers it,
# as a released lock goes to the process that has waited longest.  Each hop is
# one hand-off's minimum: a PUBLISH, Redis, the next process waking from idle
# with its caches cold from the N - 1 that ran since.  MODE=blocking uses plain
# sockets; MODE=asyncio the same on an asyncio loop, as an ASGI app has.
RING = """
import asyncio, os, socket, time
name, i, n = os.environ["NAME"], int(os.environ["I"]), int(os.environ["N"])
port = int(os.environ["PORT"])
def cmd(*a):
    return ("*%d\\r\\n" % len(a) + "".join("$%d\\r\\n%s\\r\\n" % (len(x), x) for x in a)).encode()
def messages(buf):
    # Complete pub/sub pushes in buf (7 CRLFs each): payloads and the rest.
    out = []
    while buf.count(b"\\r\\n") >= 7:
        parts = buf.split(b"\\r\\n", 7)
        out.append(parts[6]); buf = parts[7]
    return out, buf
hops = []
def on_token(payload, publish):
    if payload == b"stop":
        return False
    hops.append(time.time() - float(payload))
    publish(cmd("PUBLISH", "%s:%d" % (name, (i + 1) % n), repr(time.time())))
    return True

def blocking():
    sub = socket.create_connection(("127.0.0.1", port))
    pub = socket.create_connection(("127.0.0.1", port))
    for s in (sub, pub):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sub.sendall(cmd("SUBSCRIBE", "%s:%d" % (name, i))); sub.recv(1000)
    def publish(data):
        pub.sendall(data); pub.recv(100)
    publish(cmd("INCR", name + ":ready"))
    buf = b""
    while True:
        buf += sub.recv(4096)
        payloads, buf = messages(buf)
        for payload in payloads:
            if not on_token(payload, publish):
                return pub

async def evented():
    sr, sw = await asyncio.open_connection("127.0.0.1", port)
    pr, pw = await asyncio.open_connection("127.0.0.1", port)
    for w in (sw, pw):
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sw.write(cmd("SUBSCRIBE", "%s:%d" % (name, i))); await sr.read(1000)
    pw.write(cmd("INCR", name + ":ready")); await pr.read(100)
    def publish(data):
        pw.write(data)  # replies are drained below, off the hop's path
    async def drain():
        while await pr.read(4096):
            pass
    drainer = asyncio.create_task(drain())
    buf = b""
    while True:
        buf += await sr.read(4096)
        payloads, buf = messages(buf)
        for payload in payloads:
            if not on_token(payload, publish):
                drainer.cancel()
                return

if os.environ["MODE"] == "blocking":
    blocking()
else:
    asyncio.run(evented())
s = socket.create_connection(("127.0.0.1", port))
s.sendall(cmd("RPUSH", name + ":hops", *[repr(h) for h in hops] or ["nan"])); s.recv(100)
"""


async def ring_hops(url: str, procs: int, mode: str, seconds: float) -> list[float]:
    """Hop times of a token passed round ``procs`` processes for ``seconds``."""
    name = f"bench:ring:{secrets.token_hex(4)}"
    port = str(urlsplit(url).port or 6379)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            RING,
            env=dict(os.environ, PORT=port, NAME=name, I=str(i), N=str(procs), MODE=mode),
        )
        for i in range(procs)
    ]
    client = aioredis.Redis.from_url(url)
    try:
        for _ in range(6000):  # bounded: 60 s for the children to start
            if int(await client.get(f"{name}:ready") or 0) == procs:
                break
            await asyncio.sleep(0.01)
        await client.publish(f"{name}:0", repr(time.time()))
        await asyncio.sleep(seconds)
        for i in range(procs):
            await client.publish(f"{name}:{i}", "stop")
        for child in children:
            await asyncio.wait_for(child.wait(), 30)
        raw: list[bytes] = await client.lrange(f"{name}:hops", 0, -1)
        return [float(h) for h in raw if h != b"nan"]
    finally:
        await client.aclose()


async def floor_hops(url: str, gap: float, n: int = 1000) -> list[float]:
    """One-way hop times (half a PUBLISH ping-pong between two processes), with
    ``gap`` seconds of idleness before each, as a waiting process has."""
    name = f"bench:floor:{secrets.token_hex(4)}"
    port = str(urlsplit(url).port or 6379)
    env = dict(os.environ, PORT=port, NAME=name)
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOR, env=env)
    client = aioredis.Redis.from_url(url)
    try:
        for _ in range(1000):  # bounded: 10 s for the child to start
            if await client.exists(f"{name}:ready"):
                break
            await asyncio.sleep(0.01)
        return await asyncio.to_thread(_ping_pong, int(port), name, gap, n)
    finally:
        await client.publish(f"{name}:b", "stop")
        await client.aclose()
        await asyncio.wait_for(child.wait(), 10)


def _ping_pong(port: int, name: str, gap: float, n: int) -> list[float]:
    def cmd(*a: str) -> bytes:
        return (f"*{len(a)}\r\n" + "".join(f"${len(x)}\r\n{x}\r\n" for x in a)).encode()

    sub = socket.create_connection(("127.0.0.1", port))
    pub = socket.create_connection(("127.0.0.1", port))
    for s in (sub, pub):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sub.sendall(cmd("SUBSCRIBE", f"{name}:a"))
        sub.recv(1000)
        hops = []
        for _ in range(n):
            time.sleep(gap)
            t0 = time.perf_counter()
            pub.sendall(cmd("PUBLISH", f"{name}:b", "x"))
            pub.recv(100)
            sub.recv(1000)
            hops.append((time.perf_counter() - t0) / 2)
        return hops
    finally:
        sub.close()
        pub.close()


async def contend_processes(url: str, kind: str, procs: int, seconds: float) -> Contention:
    name = f"bench:{secrets.token_hex(4)}"
    with tempfile.NamedTemporaryFile(prefix="bench-last-", delete=False) as last:
        last.write(bytes(16))
    env = dict(
        os.environ, ROOT=str(ROOT), URL=url, KIND=kind, NAME=name, LAST=last.name, PROCS=str(procs)
    )
    children = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", PROCESS, env=env)
        for _ in range(procs)
    ]
    client = aioredis.Redis.from_url(url)
    result = Contention(seconds=seconds)
    try:
        for _ in range(6000):
            if int(await client.get(f"{name}:ready") or 0) == procs:
                break
            await asyncio.sleep(0.01)
        await client.set(f"{name}:go", time.time() + seconds)
        for child in children:
            await asyncio.wait_for(child.wait(), seconds + 60)
        raw: list[Any] = await client.lrange(f"{name}:handoffs", 0, -1)
        rows = [r.decode().split() for r in raw]
        result.acquisitions = int(await client.get(f"{name}:count") or 0)
    finally:
        await client.aclose()
        os.unlink(last.name)
    # The hand-off is measured from the previous holder's release start to our
    # acquisition, as with tasks; wall clocks of one host agree.
    by_pid: dict[str, int] = {}
    for pid, got, prev_pid, prev_at, waited in rows:
        by_pid[pid] = by_pid.get(pid, 0) + 1
        result.waits.append(float(waited))
        if prev_pid not in ("0", pid):
            result.handoffs.append(float(got) - float(prev_at))
    result.per_task = list(by_pid.values())
    return result


# --- report ----------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help="Redis URL (default: a private redis-server)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per contended run")
    parser.add_argument(
        "--processes", default="2,8,32", help="contending processes per row (comma-separated)"
    )
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop of this process and of the process contenders",
    )
    args = parser.parse_args()
    proc = None
    workdir = ""
    url = args.redis
    if url is None:
        url, proc, workdir = start_private_redis()
    client = aioredis.Redis.from_url(url)
    sync_client = redis.Redis.from_url(url)
    pottery, pottery_why = optional_peer("pottery")
    redis_lock, redis_lock_why = optional_peer("redis_lock")
    dist = Dist(
        redis=url, namespace="bench", sessions=False, scheduler=SchedulerConfig(enabled=False)
    )
    try:
        await dist.start()
        assert dist.runtime.redis is not None
        mux = dist.runtime.redis.multiplexed
        if mux is not None:
            MULTIPLEXED.append(mux)

        async def ping_rtt(ping: Callable[[], Awaitable[Any]]) -> float:
            pings = []
            for _ in range(500):
                t0 = time.perf_counter()
                await ping()
                pings.append(time.perf_counter() - t0)
            return statistics.median(pings)

        rtt_redis_py = await ping_rtt(client.ping)
        rtt = rtt_redis_py
        if mux is not None:
            # The unit is the faster client's PING: the round trip itself, with the
            # least client time on top (redis-py adds its own to every command).
            rtt = min(rtt, await ping_rtt(lambda: mux.execute_command("PING")))
        print(f"# Lock benchmark (same run, same Redis: {url}; event loop: {args.loop})\n")
        print(
            f"PING round trip (median of 500): {rtt * 1e6:.0f} µs, the unit of every RTT "
            f"below (through redis-py: {rtt_redis_py * 1e6:.0f} µs)\n"
        )
        for why in (pottery_why, redis_lock_why):
            if why:
                print(f"Skipped: {why}\n")

        print("## Uncontended acquire + release (median of 500 cycles)\n")
        print("| lock | cycle | cycle / RTT | round trips per cycle |")
        print("|---|---:|---:|---:|")
        for label, acq in (
            ("asgi_dist", asgi_dist_acquirer(dist, "u1")),
            ("redis-py Lock", redis_py_acquirer(client, "u2", 0.1)),
        ):
            before = sent()
            cycle = await uncontended(acq, 500)
            per_cycle = (sent() - before) / 500
            print(f"| {label} | {cycle * 1e6:.0f} µs | {cycle / rtt:.1f} | {per_cycle:.1f} |")
        if pottery is not None:
            before = sent()
            cycle = await uncontended(pottery_acquirer(pottery, client, "u3"), 500)
            per_cycle = (sent() - before) / 500
            label = "pottery AIORedlock (asyncio)"
            print(f"| {label} | {cycle * 1e6:.0f} µs | {cycle / rtt:.1f} | {per_cycle:.1f} |")
        if redis_lock is not None:
            before = sent()
            # In a thread, so that the loop (and asgi_dist's heartbeat) keeps running.
            cycle = await asyncio.to_thread(
                uncontended_sync, redis_lock_acquirer(redis_lock, sync_client, "u4"), 500
            )
            per_cycle = (sent() - before) / 500
            label = "python-redis-lock (sync, 1 thread)"
            print(f"| {label} | {cycle * 1e6:.0f} µs | {cycle / rtt:.1f} | {per_cycle:.1f} |")
        print()

        print(f"## Contended hand-off ({args.seconds:g} s per row, tasks in one process)\n")
        print(
            "| lock | contenders | hand-off p50 | p99 | p50 / RTT | p99 / RTT "
            "| acquisitions/s | fairness max/min | acquire wait p99 |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows: dict[tuple[str, int], Contention] = {}
        for n in (2, 8, 10, 32):
            peers: list[tuple[str, Callable[[int], Acquire]]] = [
                ("asgi_dist", _ours(dist, f"c{n}")),
                ("redis-py sleep=0.1", _theirs(client, f"p{n}", 0.1)),
                ("redis-py sleep=0.001", _theirs(client, f"q{n}", 0.001)),
            ]
            if pottery is not None:
                peers.append(("pottery AIORedlock", _pottery(pottery, client, f"r{n}")))
            for label, make in peers:
                r = await contend(make, n, args.seconds)
                rows[(label, n)] = r
                _row(label, f"{n} tasks", r, rtt)
            if redis_lock is not None:
                label = "python-redis-lock"
                r = await asyncio.to_thread(
                    contend_threads,
                    _redis_lock(redis_lock, sync_client, f"s{n}"),
                    n,
                    args.seconds,
                )
                rows[(label, n)] = r
                _row(label, f"{n} threads", r, rtt)
        print()
        counts = [int(c) for c in args.processes.split(",") if c]
        print(f"## Contended hand-off, one contender per process ({args.seconds:g} s per row)\n")
        print(
            "| lock | contenders | hand-off p50 | p99 | p50 / RTT | p99 / RTT "
            "| acquisitions/s | fairness max/min | acquire wait p99 |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for procs in counts:
            for label, kind in (
                ("asgi_dist", "asgi_dist"),
                ("asgi_dist fair=True", "asgi_dist_fair"),
                ("redis-py sleep=0.1", "sleep=0.1"),
                ("redis-py sleep=0.001", "sleep=0.001"),
            ):
                r = await contend_processes(url, kind, procs, args.seconds)
                rows[(label, -procs)] = r
                _row(label, f"{procs} processes", r, rtt)
        print()

        print("## Floor: one cross-process hop through Redis pub/sub, no lock (1000 each)\n")
        print("| idle before each hop | hop p50 | p99 | p50 / RTT | p99 / RTT |")
        print("|---|---:|---:|---:|---:|")
        for gap in (0.0, 0.002):
            hops = await floor_hops(url, gap)
            p50, p99 = pct(hops, 0.5), pct(hops, 0.99)
            print(
                f"| {gap * 1e3:g} ms | {p50 * 1e6:.0f} µs | {p99 * 1e6:.0f} µs "
                f"| {p50 / rtt:.1f} | {p99 / rtt:.1f} |"
            )
        print(
            "\nA hand-off to another process needs at least one such hop (the release's "
            "message); its waiter has been idle, like the 2 ms row.\n"
        )
        print(f"## Floor with N processes: a token passed round a ring ({args.seconds:g} s each)\n")
        print("| processes | sockets | hop p50 | p99 | p50 / RTT | p99 / RTT |")
        print("|---:|---|---:|---:|---:|---:|")
        for procs in counts:
            for mode in ("blocking", "asyncio"):
                hops = await ring_hops(url, procs, mode, args.seconds)
                p50, p99 = pct(hops, 0.5), pct(hops, 0.99)
                print(
                    f"| {procs} | {mode} | {p50 * 1e6:.0f} µs | {p99 * 1e6:.0f} µs "
                    f"| {p50 / rtt:.1f} | {p99 / rtt:.1f} |"
                )
        print(
            "\nEach hop is what a hand-off to the process that has waited longest cannot go "
            "below: a PUBLISH and the next process waking, with nothing of a lock's own.\n"
        )

        print("## Ratios (asgi_dist vs redis-py, same run)\n")
        for n in (2, 8, 10, 32, *(-c for c in counts)):
            what = f"{n} tasks" if n > 0 else f"{-n} processes"
            a, d, f = (
                rows[("asgi_dist", n)],
                rows[("redis-py sleep=0.1", n)],
                rows[("redis-py sleep=0.001", n)],
            )
            waits = ""
            if a.waits:
                waits = (
                    f"acquire wait p99 {pct(d.waits, 0.99) / pct(a.waits, 0.99):.1f}x lower than "
                    f"redis-py default and {pct(f.waits, 0.99) / pct(a.waits, 0.99):.1f}x lower "
                    "than sleep=0.001; "
                )
            print(
                f"- {what}: {waits}hand-off p99 "
                f"{pct(d.handoffs, 0.99) / pct(a.handoffs, 0.99):.1f}x lower than redis-py "
                f"default; throughput {a.throughput / f.throughput:.2f}x redis-py sleep=0.001, "
                f"{a.throughput / d.throughput:.2f}x redis-py default"
            )
            for peer in ("pottery AIORedlock", "python-redis-lock"):
                if (peer, n) in rows:
                    o = rows[(peer, n)]
                    p50 = pct(o.handoffs, 0.5) / pct(a.handoffs, 0.5)
                    p99 = pct(o.handoffs, 0.99) / pct(a.handoffs, 0.99)
                    print(
                        f"  - vs {peer}: hand-off p50 {p50:.1f}x and p99 {p99:.1f}x lower; "
                        f"throughput {a.throughput / o.throughput:.2f}x"
                    )
        print()

        admin = client
        ours_cmds = await commands_while_waiting(
            admin,
            asgi_dist_acquirer(dist, "w1"),
            [asgi_dist_acquirer(dist, "w1") for _ in range(10)],
        )
        peer_cmds = await commands_while_waiting(
            admin,
            redis_py_acquirer(client, "w2", 0.1),
            [redis_py_acquirer(client, "w2", 0.1) for _ in range(10)],
        )
        peer_fast = await commands_while_waiting(
            admin,
            redis_py_acquirer(client, "w3", 0.001),
            [redis_py_acquirer(client, "w3", 0.001) for _ in range(10)],
        )
        print("## Round trips per second per waiting contender (10 waiters, 1 s)\n")
        print("| lock | round trips/s per waiter |")
        print("|---|---:|")
        print(f"| asgi_dist | {max(ours_cmds, 0):.1f} |")
        print(f"| redis-py sleep=0.1 | {peer_cmds:.1f} |")
        print(f"| redis-py sleep=0.001 | {peer_fast:.1f} |")
    finally:
        await dist.stop()
        await client.aclose()
        sync_client.close()
        if proc is not None:
            proc.kill()
            proc.wait(5)
            shutil.rmtree(workdir, ignore_errors=True)


def _ours(dist: Dist, name: str) -> Callable[[int], Acquire]:
    return lambda i: asgi_dist_acquirer(dist, name)


def _theirs(client: aioredis.Redis, name: str, sleep: float) -> Callable[[int], Acquire]:
    return lambda i: redis_py_acquirer(client, name, sleep)


def _pottery(pottery: Any, client: aioredis.Redis, name: str) -> Callable[[int], Acquire]:
    return lambda i: pottery_acquirer(pottery, client, name)


def _redis_lock(redis_lock: Any, client: redis.Redis, name: str) -> Callable[[int], SyncAcquire]:
    return lambda i: redis_lock_acquirer(redis_lock, client, name)


def _row(label: str, what: str, r: Contention, rtt: float) -> None:
    p50, p99 = pct(r.handoffs, 0.5), pct(r.handoffs, 0.99)
    spread = max(r.per_task) / max(1, min(r.per_task)) if r.per_task else float("nan")
    wait99 = f"{pct(r.waits, 0.99) * 1e3:.1f} ms" if r.waits else "-"
    print(
        f"| {label} | {what} | {p50 * 1e3:.2f} ms | {p99 * 1e3:.2f} ms | {p50 / rtt:.1f} "
        f"| {p99 / rtt:.1f} | {r.throughput:.0f} | {spread:.1f} | {wait99} |"
    )


if __name__ == "__main__":
    if "--loop" in sys.argv and sys.argv[sys.argv.index("--loop") + 1 :][:1] == ["uvloop"]:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        os.environ["LOOP"] = "uvloop"  # the process contenders' loop too
    asyncio.run(main())
