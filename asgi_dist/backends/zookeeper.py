"""ZooKeeper: one kazoo client per Dist, for the ZooKeeper lock backend.

``Dist(zookeeper="host:port[,host:port][/chroot]")`` or ``ASGI_DIST_ZOOKEEPER_HOSTS``.
Every znode of a Dist lives under ``/asgi_dist/<namespace>``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from asgi_dist.errors import BackendUnavailable, ConfigError

__all__ = ["ZooKeeperBackend"]

log = logging.getLogger("asgi_dist.zookeeper")


class ZooKeeperBackend:
    """The ZooKeeper session of one Dist (kazoo runs it on its own thread)."""

    def __init__(self, hosts: str, *, namespace: str, connect_timeout: float = 5.0) -> None:
        if not isinstance(hosts, str) or not hosts.strip():
            raise ConfigError(
                f"zookeeper={hosts!r} is invalid: use 'host:port[,host:port][/chroot]'"
            )
        self.hosts = hosts
        self.where = hosts.rpartition("@")[2]
        self.namespace = namespace
        self.root = f"/asgi_dist/{namespace}"
        self.connect_timeout = connect_timeout
        self.client: Any = None

    async def start(self) -> None:
        try:
            from kazoo.client import KazooClient
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "the ZooKeeper backend needs kazoo: pip install 'asgi-dist[zookeeper]'"
            ) from exc
        client = KazooClient(hosts=self.hosts, timeout=max(self.connect_timeout, 2.0))
        try:
            await asyncio.to_thread(client.start, self.connect_timeout)
        except Exception as exc:
            await asyncio.to_thread(client.close)
            raise BackendUnavailable(
                f"ZooKeeper at {self.where} did not answer within {self.connect_timeout:g}s "
                f"({type(exc).__name__}: {exc}); start it or fix Dist(zookeeper=...) / "
                "ASGI_DIST_ZOOKEEPER_HOSTS"
            ) from exc
        await asyncio.to_thread(client.ensure_path, self.root)
        self.client = client

    async def stop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await asyncio.to_thread(client.stop)
            await asyncio.to_thread(client.close)
