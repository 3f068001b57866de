"""The flash-sale shop: embedded in one process, and as a 3-process cluster under Locust."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers.processes import ROOT, ProcessGroup


def _embedded_env() -> dict[str, str]:
    env = {k: "" for k in os.environ if k.startswith("ASGI_DIST_")}
    env.update({"SHOP_SKUS": "sku-1:2", "SHOP_UNPAID_TTL": "60"})
    return env


async def test_shop_runs_on_the_embedded_default(processes: ProcessGroup) -> None:
    (shop,) = processes.uvicorn("examples.shop.app:app", env=_embedded_env())
    async with httpx.AsyncClient(base_url=shop.url) as client:
        assert (await client.post("/buy/sku-1")).status_code == 401  # log in first
        login = await client.post("/login", json={"user": "ada"})
        assert login.status_code == 200, shop.output()
        assert (await client.post("/cart/sku-1")).json()["edits"] == 1
        assert (await client.get("/me")).json() == {
            "user": "ada",
            "cart": {"sku-1": 1},
            "edits": 1,
        }
        first = await client.post("/buy/sku-1")
        second = await client.post("/buy/sku-1")
        third = await client.post("/buy/sku-1")
        assert [first.status_code, second.status_code, third.status_code] == [201, 201, 409]
        assert first.json()["fence"] < second.json()["fence"]
        assert (await client.post(f"/pay/{first.json()['order_id']}")).status_code == 200
        assert (await client.post("/logout")).status_code == 200
        assert (await client.get("/me")).json()["user"] is None


def test_shop_cluster_under_locust_with_a_sigkill_keeps_every_invariant(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "loadtests/run_cluster.py", "--users", "20", "--duration", "16",
         "--kill", "--skus", "sku-1:40,sku-2:40", "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(report.read_text())
    assert all(result["checks"].values()), result["checks"]
    assert result["invariants"]["orders"] > 0
    assert result["invariants"]["expiry_fires"] > 0
    assert result["killed"] is not None
