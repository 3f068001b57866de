"""Private Redis servers on free loopback ports, for tests that kill, pause or restart them.

Never touch the shared services: everything here starts its own processes,
owns them, and kills them when the fixture ends.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RedisServer", "free_port", "redis_cluster", "redis_sentinel", "wait_port"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; Redis refuses ports
    above 55535 with cluster mode on, and the kernel's ephemeral range goes higher."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def wait_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TimeoutError(f"the process for port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """A private ``redis-server``: ``kill()``, ``pause()``, ``resume()``, ``restart()``."""

    def __init__(self, *extra: str, port: int | None = None) -> None:
        self.cluster = "--cluster-enabled" in extra
        self.port = port or (free_cluster_port() if self.cluster else free_port())
        self.extra = list(extra)
        self.dir = Path(tempfile.mkdtemp(prefix=f"asgi-dist-redis-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        for attempt in range(3):
            log = self.dir / "redis.log"
            args = [
                REDIS_SERVER,
                *self.extra,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--protected-mode", "no",
                "--logfile", str(log),
            ]  # fmt: skip
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            try:
                wait_port(self.port, 20, self.proc)
                return self
            except TimeoutError:
                self.proc.kill()
                self.proc.wait(5)
                if attempt == 2:
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    message = f"redis-server on {self.port} did not start:\n{tail}"
                    raise TimeoutError(message) from None
                # The port was taken between probe and bind.
                self.port = free_cluster_port() if self.cluster else free_port()
        raise AssertionError("unreachable")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.kill()
            self.proc.wait(5)

    paused = False

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def restart(self) -> None:
        self.kill()
        self.start()

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *args], capture_output=True, check=True, timeout=10
        )
        return out.stdout.decode().strip()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def redis_cluster(masters: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of ``masters`` primaries (no replicas) on free ports."""
    nodes = [
        RedisServer(
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000",
        ).start()
        for _ in range(masters)
    ]  # fmt: skip
    try:
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, check=True, timeout=30,
        )  # fmt: skip
        # Every node must be ok and agree on the slot map before the first command:
        # a node that still answers CLUSTERDOWN or MOVED makes clients retry.
        deadline = time.monotonic() + 30
        while not _cluster_settled(nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the private Redis Cluster did not settle (cluster_state:ok)")
            time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.close()


def _cluster_settled(nodes: list[RedisServer]) -> bool:
    if not all("cluster_state:ok" in n.cli("cluster", "info") for n in nodes):
        return False
    maps = {n.cli("cluster", "slots") for n in nodes}
    return len(maps) == 1


@contextlib.contextmanager
def redis_sentinel(service: str = "mymaster") -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary plus one Sentinel watching it; yields (primary, sentinel)."""
    primary = RedisServer().start()
    sentinel_port = free_port()
    conf = primary.dir / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\nprotected-mode no\n"
        f"sentinel monitor {service} 127.0.0.1 {primary.port} 1\n"
        f"sentinel down-after-milliseconds {service} 2000\n"
    )
    sentinel = RedisServer(str(conf), "--sentinel", port=sentinel_port)
    # redis-server expects the config file first.
    sentinel.extra = []
    try:
        sentinel.proc = subprocess.Popen(
            [REDIS_SERVER, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(sentinel_port)
        yield primary, sentinel
    finally:
        sentinel.close()
        primary.close()
