"""Run the flash-sale shop as N uvicorn processes, load it with Locust, check its invariants.

    python loadtests/run_cluster.py --users 60 --duration 60            # normal mode
    python loadtests/run_cluster.py --users 60 --duration 60 --kill     # SIGKILL one halfway

Needs Redis and PostgreSQL (ASGI_DIST_REDIS_URL / ASGI_DIST_POSTGRES_DSN, default the local
ports) and locust (pip install -e '.[load]').  Every run uses a fresh namespace.  After the
load it waits for the outbox to drain and checks:

* no oversell: for every SKU, sold <= initial and stock + sold == initial;
* every order has exactly one confirmation (outbox -> stream -> consumer inbox);
* each fire of the expiry job ran once across the cluster;
* no session lost an acknowledged update (checked by the Locust users);
* no error responses other than the designed 409s.

Prints a report (requests/s, p50/p95/p99 per endpoint, invariants), writes it as JSON with
--report, and exits non-zero when an invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("ASGI_DIST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("ASGI_DIST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_shops(
    n: int, env: dict[str, str], logs: Path
) -> list[tuple[subprocess.Popen[bytes], str]]:
    shops = []
    for i in range(n):
        port = free_port()
        log = (logs / f"shop-{i}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.shop.app:app", "--host", "127.0.0.1",
             "--port", str(port), "--lifespan", "on", "--log-level", "warning",
             "--no-access-log"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        shops.append((proc, f"http://127.0.0.1:{port}"))
    deadline = time.monotonic() + 60
    for proc, url in shops:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"a shop process exited at start; see {logs}")
            try:
                if httpx.get(f"{url}/products", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the shop at {url} did not come up; see {logs}")
            time.sleep(0.2)
    return shops


def read_stats(prefix: Path) -> list[dict[str, Any]]:
    rows = []
    with open(f"{prefix}_stats.csv") as f:
        for row in csv.DictReader(f):
            rows.append(
                {
                    "name": f"{row['Type']} {row['Name']}".strip(),
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                    "rps": float(row["Requests/s"]),
                    "p50": row["50%"],
                    "p95": row["95%"],
                    "p99": row["99%"],
                }
            )
    return rows


async def check_invariants(namespace: str, locust_results: dict[str, Any]) -> dict[str, Any]:
    conn = await asyncpg.connect(POSTGRES_DSN)
    t = lambda name: f"{namespace}_{name}"  # noqa: E731
    try:
        # Let the relay and the consumers drain: every order confirmed, or 60 s.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            unconfirmed = await conn.fetchval(
                f"SELECT count(*) FROM {t('orders')} o WHERE NOT EXISTS"
                f" (SELECT 1 FROM {t('confirmations')} c WHERE c.order_id = o.id)"
            )
            if unconfirmed == 0:
                break
            await asyncio.sleep(0.5)
        stock = await conn.fetch(
            f"SELECT s.sku, s.initial, s.qty, count(o.id) FILTER"
            f" (WHERE o.status IN ('pending', 'paid')) AS sold,"
            f" count(o.id) FILTER (WHERE o.status = 'expired') AS expired"
            f" FROM {t('stock')} s LEFT JOIN {t('orders')} o ON o.sku = s.sku"
            f" GROUP BY s.sku ORDER BY s.sku"
        )
        per_order = await conn.fetch(
            f"SELECT o.id, count(c.order_id) AS n FROM {t('orders')} o"
            f" LEFT JOIN {t('confirmations')} c ON c.order_id = o.id GROUP BY o.id"
        )
        fires = await conn.fetch(
            f"SELECT fire_id, count(*) AS n FROM {t('expiry_runs')} GROUP BY fire_id"
        )
    finally:
        await conn.close()
    orders = len(per_order)
    return {
        "skus": [dict(r) for r in stock],
        "orders": orders,
        "no_oversell": all(r["sold"] <= r["initial"] and r["qty"] >= 0 for r in stock),
        "stock_plus_sold_is_initial": all(r["qty"] + r["sold"] == r["initial"] for r in stock),
        "unconfirmed_orders": sum(1 for r in per_order if r["n"] == 0),
        "duplicate_confirmations": sum(1 for r in per_order if r["n"] > 1),
        "expiry_fires": len(fires),
        "expiry_fires_run_twice": sum(1 for r in fires if r["n"] > 1),
        "session_lost_updates": locust_results.get("lost_updates", 0),
    }


async def drop_namespace(namespace: str) -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE $1", f"{namespace}\\_%"
        )
        for row in tables:
            await conn.execute(f'DROP TABLE IF EXISTS "{row["tablename"]}" CASCADE')
    finally:
        await conn.close()


def markdown(report: dict[str, Any]) -> str:
    """The report as the Markdown tables of loadtests/README.md."""
    lines = [
        f"{report['mode']} mode: {report['processes']} processes, {report['users']} users, "
        f"{report['duration_s']} s, {report['cpu_count']} CPUs"
        + (f", SIGKILL of {report['killed']} halfway" if report["killed"] else ""),
        "",
        "| endpoint | requests | failures | req/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["stats"]:
        lines.append(
            f"| {r['name']} | {r['requests']} | {r['failures']} | {r['rps']:.1f} "
            f"| {r['p50']} | {r['p95']} | {r['p99']} |"
        )
    inv = report["invariants"]
    lines += [
        "",
        f"orders {inv['orders']}, expiry fires {inv['expiry_fires']}, "
        f"fail-overs {report['failovers']}",
        "",
        "| invariant | result |",
        "|---|---|",
    ]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} |" for name, ok in report["checks"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--duration", type=int, default=60, help="seconds of load (max 600)")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--kill", action="store_true", help="SIGKILL one process halfway")
    parser.add_argument("--skus", default="sku-1:150,sku-2:150,sku-3:150")
    parser.add_argument("--report", type=Path, help="write the report as JSON here")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    args = parser.parse_args()
    duration = min(max(args.duration, 5), 600)
    users = min(max(args.users, 1), 1000)

    namespace = f"shop_{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix="asgi-dist-load-"))
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "ASGI_DIST_REDIS_URL": REDIS_URL,
            "ASGI_DIST_POSTGRES_DSN": POSTGRES_DSN,
            "ASGI_DIST_NAMESPACE": namespace,
            "ASGI_DIST_SECRET_KEYS": secrets.token_urlsafe(32),
            "ASGI_DIST_LEADER_TTL": "3",
            "SHOP_SKUS": args.skus,
            "SHOP_UNPAID_TTL": "5",
            "SHOP_EXPIRE_EVERY": "1",
        }
    )
    shops = start_shops(args.processes, env, work)
    hosts = [url for _, url in shops]
    print(f"shop: {args.processes} processes {hosts}, namespace {namespace}, logs {work}")
    prefix = work / "locust"
    env.update({"SHOP_HOSTS": ",".join(hosts), "LOCUST_RESULT_FILE": str(work / "users.json")})
    started = time.monotonic()
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
         "--headless", "-u", str(users), "-r", str(users), "-t", f"{duration}s",
         "--host", hosts[0], "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"],
        env=env, cwd=ROOT, stdout=(work / "locust.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    killed = None
    try:
        if args.kill:
            time.sleep(duration / 2)
            proc, killed = shops[-1]
            proc.send_signal(signal.SIGKILL)
            print(f"SIGKILL {killed} at {time.monotonic() - started:.1f}s")
        locust.wait(duration + 120)
        results = json.loads((work / "users.json").read_text())
        invariants = asyncio.run(check_invariants(namespace, results))
        stats = read_stats(prefix)
        with open(f"{prefix}_exceptions.csv") as f:
            exceptions = list(csv.DictReader(f))
    finally:
        for proc, _ in shops:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in shops:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    # Refused connections to the killed process are fail-overs, counted apart.
    unexpected_errors = sum(
        r["failures"] for r in stats if r["name"] != "Aggregated" and "(failover)" not in r["name"]
    )
    checks = {
        "no oversell": invariants["no_oversell"],
        "stock + sold == initial": invariants["stock_plus_sold_is_initial"],
        "every order confirmed exactly once": invariants["unconfirmed_orders"] == 0
        and invariants["duplicate_confirmations"] == 0,
        "each expiry fire ran once": invariants["expiry_fires_run_twice"] == 0,
        "no session lost an update": invariants["session_lost_updates"] == 0,
        "no undesigned error responses": unexpected_errors == 0,
        "the load ran (every endpoint served, no exceptions in users)": not exceptions
        and all(
            any(r["name"].endswith(endpoint) and r["requests"] > 0 for r in stats)
            for endpoint in ("/buy/{sku}", "/cart/{sku}", "/me", "/login")
        ),
    }
    report = {
        "mode": "kill" if args.kill else "normal",
        "users": users,
        "duration_s": duration,
        "processes": args.processes,
        "killed": killed,
        "failovers": results.get("failovers", 0),
        "cpu_count": os.cpu_count(),
        "stats": stats,
        "invariants": invariants,
        "checks": checks,
        "lost_update_examples": results.get("lost_update_examples", []),
        "user_exceptions": [e["Message"] for e in exceptions],
    }
    print(
        f"\n{'endpoint':<28}{'requests':>10}{'fail':>6}{'req/s':>9}{'p50':>7}{'p95':>7}{'p99':>7}"
    )
    for r in stats:
        print(
            f"{r['name']:<28}{r['requests']:>10}{r['failures']:>6}{r['rps']:>9.1f}"
            f"{r['p50']:>7}{r['p95']:>7}{r['p99']:>7}"
        )
    print(f"\norders {invariants['orders']}, expiry fires {invariants['expiry_fires']}")
    for sku in invariants["skus"]:
        print(f"  {sku['sku']}: initial {sku['initial']} stock {sku['qty']} sold {sku['sold']}"
              f" expired {sku['expired']}")  # fmt: skip
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.markdown:
        print(markdown(report))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2, default=str))
    if all(checks.values()):
        asyncio.run(drop_namespace(namespace))
        return 0
    print(f"invariants failed; tables of {namespace} and logs in {work} are kept")
    return 1


if __name__ == "__main__":
    sys.exit(main())
