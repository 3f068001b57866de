"""Locust load for the flash-sale shop (examples/shop), spread over several shop processes.

    SHOP_HOSTS=http://127.0.0.1:8001,http://127.0.0.1:8002 \\
    locust -f loadtests/locustfile.py --headless -u 50 -r 50 -t 60s --host http://127.0.0.1:8001

Each request goes to a random live process (the cookie is shared across ports,
as behind a load balancer), so every session is read and written on several nodes.
Three user classes with realistic weights and think time:

* Browser (6): reads its session and the stock -- read-only session traffic;
* CartEditor (3): adds to its cart and checks that no acknowledged edit was lost,
  also when the next read lands on another process;
* Buyer (2): buys (lock + transaction + outbox), 409 when sold out or busy is a
  designed answer, then pays half of its orders.

Session lost updates and fail-overs are written to LOCUST_RESULT_FILE as JSON.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from typing import Any

from locust import HttpUser, between, events, task

HOSTS = os.environ.get("SHOP_HOSTS", "http://127.0.0.1:8000").split(",")
SKUS = [s.partition(":")[0] for s in os.environ.get("SHOP_SKUS", "sku-1:50").split(",")]
alive = list(HOSTS)
results: dict[str, Any] = {"lost_updates": 0, "lost_update_examples": [], "failovers": 0}


@events.test_stop.add_listener
def write_results(**_: Any) -> None:
    path = os.environ.get("LOCUST_RESULT_FILE")
    if path:
        with open(path, "w") as f:
            json.dump(results, f)


class ShopUser(HttpUser):
    abstract = True
    wait_time = between(0.05, 0.5)
    host = HOSTS[0]

    def call(self, method: str, path: str, name: str | None = None, **kwargs: Any) -> Any:
        """Send to a random live process; use the result in ``with``.

        A refused connection means the process is gone (the SIGKILL mode): like a
        load balancer, drop it and retry elsewhere.  Those attempts are reported
        under "(failover)" names, apart from the shop's own answers.
        """
        for _ in range(len(HOSTS) + 1):
            base = random.choice(alive)
            response = self.client.request(
                method, base + path, name=name or path, catch_response=True, **kwargs
            )
            if response.status_code != 0:
                return response
            with response:
                response.request_meta["name"] = f"(failover) {name or path}"
                response.failure(f"{base} refused the connection")
            if base in alive and len(alive) > 1:
                alive.remove(base)
            results["failovers"] += 1
        raise RuntimeError("no shop process is reachable")

    def on_start(self) -> None:
        self.user = f"user-{uuid.uuid4().hex[:12]}"
        self.edits = 0
        with self.call("POST", "/login", json={"user": self.user}):
            pass

    def lost(self, expected: int, seen: int, where: str) -> None:
        results["lost_updates"] += 1
        if len(results["lost_update_examples"]) < 10:
            results["lost_update_examples"].append(
                {"user": self.user, "expected": expected, "seen": seen, "where": where}
            )


class Browser(ShopUser):
    weight = 6

    @task(3)
    def me(self) -> None:
        with self.call("GET", "/me"):
            pass

    @task(1)
    def products(self) -> None:
        with self.call("GET", "/products"):
            pass


class CartEditor(ShopUser):
    weight = 3

    @task(3)
    def add(self) -> None:
        sku = random.choice(SKUS)
        with self.call("POST", f"/cart/{sku}", name="/cart/{sku}") as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            self.edits += 1
            seen = response.json()["edits"]
            if seen != self.edits:
                self.lost(self.edits, seen, "write")
                self.edits = seen

    @task(1)
    def check(self) -> None:
        with self.call("GET", "/me", name="/me (check)") as response:
            if response.status_code == 200 and response.json()["edits"] != self.edits:
                self.lost(self.edits, response.json()["edits"], "read")


class Buyer(ShopUser):
    weight = 2

    @task
    def buy(self) -> None:
        sku = random.choice(SKUS)
        with self.call("POST", f"/buy/{sku}", name="/buy/{sku}") as response:
            if response.status_code == 409:
                response.success()  # sold out or busy: a designed answer
                return
            if response.status_code != 201:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            order_id = response.json()["order_id"]
        if random.random() < 0.5:
            with self.call("POST", f"/pay/{order_id}", name="/pay/{order_id}") as response:
                if response.status_code == 409:
                    response.success()  # expired before payment: designed
