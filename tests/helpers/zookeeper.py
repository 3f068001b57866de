"""A private standalone ZooKeeper on a free loopback port, for tests that may kill it.

It runs ``ZooKeeperServerMain`` from the Debian ``zookeeper`` package (Java 17)
with its own config and dataDir in a temp dir.  The tick is short (100 ms) so
that sessions of a second or two are allowed and expire promptly.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers.servers import free_port

__all__ = ["ZooKeeperServer", "missing"]

JAVA = shutil.which("java") or "/usr/bin/java"
# Debian's zookeeper.jar names its dependencies in its manifest's Class-Path.
JAR = Path("/usr/share/java/zookeeper.jar")
MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"


def missing() -> str | None:
    """Why no ZooKeeper can be started here, or None."""
    if not Path(JAVA).exists():
        return "java is not installed (apt-get install openjdk-17-jre-headless)"
    if not JAR.exists():
        return f"ZooKeeper is not installed: {JAR} is missing (apt-get install zookeeper)"
    return None


def ruok(port: int, timeout: float = 0.5) -> bool:
    """ZooKeeper's own health check: the four-letter word ``ruok`` answers ``imok``."""
    with contextlib.suppress(OSError):
        with socket.create_connection(("127.0.0.1", port), timeout) as sock:
            sock.sendall(b"ruok")
            sock.settimeout(timeout)
            return sock.recv(16) == b"imok"
    return False


class ZooKeeperServer:
    """``start()``, ``kill()``, ``close()``; ``hosts`` is the kazoo connect string."""

    def __init__(self, *, tick_ms: int = 100) -> None:
        self.port = free_port()
        self.tick_ms = tick_ms
        self.dir = Path(tempfile.mkdtemp(prefix=f"asgi-dist-zk-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ZooKeeperServer:
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        conf = self.dir / "zoo.cfg"
        conf.write_text(
            f"tickTime={self.tick_ms}\n"
            f"dataDir={data}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            f"minSessionTimeout={2 * self.tick_ms}\n"
            "maxSessionTimeout=60000\n"
            "maxClientCnxns=0\n"
            # The admin server would take port 8080; ruok proves readiness.
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,srvr\n"
            # No fsync per write: the data dir is thrown away anyway.
            "forceSync=no\n"
        )
        log = self.dir / "zookeeper.log"
        self.proc = subprocess.Popen(
            [JAVA, "-Xms32m", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             # Empty container nodes (idle lock names) go within 0.2 s, not 60 s.
             "-Dznode.container.checkIntervalMs=200",
             "-cp", str(JAR), MAIN, str(conf)],
            # Appended: a restart keeps what the server said before it.
            stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=self.dir,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited with {self.proc.returncode}:\n{self.log()}")
            if ruok(self.port):
                return self
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"ZooKeeper did not answer ruok within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        path = self.dir / "zookeeper.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
