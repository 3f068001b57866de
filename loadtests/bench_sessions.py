"""Session layers compared: requests/s, p50/p99 and store round trips per request.

    pip install starsessions      # the peer, for this comparison only
    python loadtests/bench_sessions.py [--seconds 4] [--connections 16]

One run on one machine.  Each layer is served by one uvicorn process (the same
Starlette app, ``bench_sessions_app.py``) and loaded over loopback by a small
keep-alive HTTP/1.1 client in this process, on two endpoints: ``GET /read``
(reads one key) and ``POST /write`` (reads one key, writes one).  Layers: bare app,
Starlette's cookie ``SessionMiddleware``, starsessions with its Redis store,
asgi_dist on Redis, on Redis with the near cache, and on PostgreSQL.

Redis is a private ``redis-server`` started here (so other users of the machine do
not skew it); PostgreSQL is ASGI_DIST_TEST_POSTGRES_DSN's server (default the local
port), in a fresh database dropped afterwards.  Round trips per request are counted
in-process with a client that counts the commands it sends (Redis layers).
Prints ratios to starsessions (and read-only with near cache against Starlette's
cookie sessions).  Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ["bare", "starlette", "starsessions", "asgi_dist_redis", "asgi_dist_near", "asgi_dist_pg"]
PG_ADMIN = os.environ.get(
    "ASGI_DIST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


# load generator ------------------------------------------------------------------


class Conn:
    """One keep-alive HTTP/1.1 connection; just enough protocol for this app."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.cookie = b""

    async def request(self, method: str, path: str) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nhost: bench\r\ncontent-length: 0\r\n".encode()
        if self.cookie:
            head += b"cookie: " + self.cookie + b"\r\n"
        self.writer.write(head + b"\r\n")
        status_and_headers = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in status_and_headers.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"set-cookie":
                self.cookie = value.strip().split(b";")[0]
        body = await self.reader.readexactly(length)
        if not status_and_headers.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{method} {path}: {status_and_headers[:40]!r} {body[:200]!r}")
        return body


async def load(
    port: int, method: str, path: str, seconds: float, connections: int
) -> dict[str, float]:
    conns = []
    for _ in range(connections):
        conn = Conn(*await asyncio.open_connection("127.0.0.1", port))
        await conn.request("POST", "/init")  # every connection has its own session
        conns.append(conn)
    latencies: list[float] = []
    warmup_end = time.perf_counter() + 0.5
    end = warmup_end + seconds

    async def run(conn: Conn) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            await conn.request(method, path)
            t1 = time.perf_counter()
            if t0 >= warmup_end:
                latencies.append(t1 - t0)

    await asyncio.gather(*(run(c) for c in conns))
    for conn in conns:
        conn.writer.close()
    latencies.sort()
    n = len(latencies)
    return {
        "rps": n / seconds,
        "p50": latencies[n // 2] * 1000 if n else 0.0,
        "p99": latencies[int(n * 0.99)] * 1000 if n else 0.0,
    }


# round trips -----------------------------------------------------------------------


async def round_trips(kind: str, redis_url: str) -> dict[str, float] | None:
    """Store commands per request, counted on the app's own client (Redis layers only)."""
    if kind not in ("starsessions", "asgi_dist_redis", "asgi_dist_near"):
        return None
    import httpx
    import redis.asyncio as aioredis

    class Counting(aioredis.Redis):
        count = 0

        async def execute_command(self, *args: Any, **options: Any) -> Any:
            Counting.count += 1
            return await super().execute_command(*args, **options)

    client = Counting.from_url(redis_url)
    from loadtests.bench_sessions_app import SECRET, endpoints

    dist = None
    if kind == "starsessions":
        from starsessions import SessionAutoloadMiddleware, SessionMiddleware
        from starsessions.stores.redis import RedisStore

        app: Any = SessionMiddleware(
            SessionAutoloadMiddleware(endpoints()), store=RedisStore(connection=client),
            cookie_https_only=False, lifetime=3600,
        )  # fmt: skip
    else:
        from asgi_dist import Dist
        from asgi_dist.scheduling import SchedulerConfig
        from asgi_dist.sessions import SessionConfig

        dist = Dist(
            client,
            namespace=f"rt_{secrets.token_hex(4)}",
            secret_keys=[SECRET],
            sessions=SessionConfig(near_cache=kind == "asgi_dist_near"),
            scheduler=SchedulerConfig(enabled=False),
        )
        await dist.start()
        app = dist.wrap(endpoints())
    out: dict[str, float] = {}
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            for label, method, path in (
                ("no-cookie", "GET", "/read"),
                ("init", "POST", "/init"),
                ("read", "GET", "/read"),
                ("write", "POST", "/write"),
            ):
                await http.request(method, path)  # warm (near cache, script cache)
                before = Counting.count
                for _ in range(20):
                    if label == "no-cookie":
                        http.cookies.clear()
                    await http.request(method, path)
                out[label] = (Counting.count - before) / 20
    finally:
        if dist is not None:
            await dist.stop()
        await client.aclose()
    return out


# main ----------------------------------------------------------------------------------


def serve(kind: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "loadtests.bench_sessions_app:app", "--host",
         "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env={**os.environ, **env, "BENCH_KIND": kind,
                       "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    wait_port(port)
    return proc, port


def start_redis() -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port)
    return proc, directory, f"redis://127.0.0.1:{port}/0"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds over all layers; the best round counts"
    )
    args = parser.parse_args()
    kinds = args.kinds.split(",")

    redis_proc, redis_dir, redis_url = start_redis()
    database = f"sessions_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{database}"')
    pg_dsn = PG_ADMIN.rsplit("/", 1)[0] + f"/{database}"
    results: dict[str, dict[str, Any]] = {}
    try:
        # Layers alternate within each round and the best round counts, so that a
        # burst of other load on a shared machine does not decide a ratio.
        # The order flips every round too, so that no layer always runs first or last.
        for round_no in range(args.rounds):
            for kind in kinds if round_no % 2 == 0 else kinds[::-1]:
                env = {
                    "BENCH_REDIS_URL": redis_url,
                    "BENCH_POSTGRES_DSN": pg_dsn,
                    "BENCH_NAMESPACE": f"b_{secrets.token_hex(4)}",
                }
                proc, port = serve(kind, env)
                try:
                    best = results.setdefault(kind, {})
                    for endpoint, method, path in (("read", "GET", "/read"),
                                                   ("write", "POST", "/write")):  # fmt: skip
                        run = await load(port, method, path, args.seconds, args.connections)
                        best.setdefault("rounds", {}).setdefault(endpoint, []).append(run["rps"])
                        if run["rps"] > best.get(endpoint, {"rps": -1.0})["rps"]:
                            best[endpoint] = run
                finally:
                    proc.terminate()
                    proc.wait(15)
                if round_no == 0:
                    best["trips"] = await round_trips(kind, redis_url)
                print(f"round {round_no + 1}: measured {kind}", file=sys.stderr)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(redis_dir, ignore_errors=True)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    report(results, args)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    load1, load5, _ = os.getloadavg()
    print(
        f"\n{args.connections} connections, {args.seconds:g} s per endpoint, one uvicorn "
        f"process, best of {args.rounds} rounds; {os.cpu_count()} CPUs, load average "
        f"{load1:.1f} (1 min) / {load5:.1f} (5 min) at the end\n"
    )
    print("| layer | read req/s | p50 ms | p99 ms | modify req/s | p50 ms | p99 ms "
          "| store trips no-cookie/read/modify |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        trips = r["trips"]
        trip_text = (
            f"{trips['no-cookie']:g} / {trips['read']:g} / {trips['write']:g}" if trips else "n/a"
        )
        print(
            f"| {kind} | {r['read']['rps']:.0f} | {r['read']['p50']:.2f} | {r['read']['p99']:.2f} "
            f"| {r['write']['rps']:.0f} | {r['write']['p50']:.2f} | {r['write']['p99']:.2f} "
            f"| {trip_text} |"
        )
    peer = results.get("starsessions")
    if peer:
        print("\nratios to starsessions (read-only / modify):")
        for kind in ("asgi_dist_redis", "asgi_dist_near", "asgi_dist_pg"):
            if kind in results:
                r = results[kind]
                print(
                    f"  {kind}: {r['read']['rps'] / peer['read']['rps']:.2f}x / "
                    f"{r['write']['rps'] / peer['write']['rps']:.2f}x"
                )
    if "starlette" in results and "asgi_dist_near" in results:
        ratio = results["asgi_dist_near"]["read"]["rps"] / results["starlette"]["read"]["rps"]
        print(f"read-only, asgi_dist near cache vs Starlette cookie sessions: {ratio:.2f}x")
    spread(results)


def spread(results: dict[str, dict[str, Any]]) -> None:
    """Per-round ratios (each layer against its peer measured in the same round), so that
    the spread a shared machine causes is visible next to the best-round table."""
    pairs = [
        ("asgi_dist_redis", "starsessions", "read"),
        ("asgi_dist_redis", "starsessions", "write"),
        ("asgi_dist_near", "starsessions", "read"),
        ("asgi_dist_near", "starsessions", "write"),
        ("asgi_dist_near", "starlette", "read"),
        ("asgi_dist_pg", "starsessions", "read"),
        ("asgi_dist_pg", "starsessions", "write"),
    ]
    print("\nper-round ratios (median, min-max):")
    for kind, peer, endpoint in pairs:
        if kind not in results or peer not in results:
            continue
        ours, theirs = results[kind]["rounds"][endpoint], results[peer]["rounds"][endpoint]
        ratios = sorted(a / b for a, b in zip(ours, theirs, strict=False))
        median = ratios[len(ratios) // 2]
        print(
            f"  {kind} / {peer} {endpoint}: {median:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}x; "
            + " ".join(f"{r:.2f}" for r in ratios)
            + ")"
        )


if __name__ == "__main__":
    asyncio.run(main())
