"""Redis: one client factory for every deployment shape, tagged keys, and Lua scripts.

URL forms::

    redis://[:password@]host:port[/db]            rediss:// for TLS
    redis+sentinel://[:password@]host:port[,host:port]/service_name[/db]
    redis+cluster://[:password@]host:port[,host:port]

Every key of one object shares the hash tag ``{namespace:kind:name}`` so that
a Lua script touching them runs on one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel

from asgi_dist._checks import shown_url
from asgi_dist.backends.resp import MultiplexedRedis, ReplyCallback
from asgi_dist.errors import BackendUnavailable, ConfigError

__all__ = [
    "LONGEST_BLOCK",
    "RedisBackend",
    "RedisClient",
    "Script",
    "ScriptClient",
    "block_ms",
    "create_multiplexed",
    "create_redis_client",
    "describe_redis_url",
    "read_timeout",
    "validate_name",
]

log = logging.getLogger("asgi_dist.redis")

RedisClient: TypeAlias = "Redis | RedisCluster"
# What scripts run on: redis-py, or the multiplexed connection of the hot paths.
ScriptClient: TypeAlias = "Redis | RedisCluster | MultiplexedRedis"

MAX_NAME_LENGTH = 512
MAX_CONNECTIONS = 512  # per process, for one server
_SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster", "unix")

# The longest BLOCK (s) of a blocking read (XREAD/XREADGROUP) the library sends through
# redis-py: the scheduler's dispatch reads block this long, a consumer's idle read its
# claim_interval capped at this (block_ms).
LONGEST_BLOCK = 4.0


def read_timeout(connect_timeout: float) -> float:
    """The ``socket_timeout`` of every redis-py connection we build: how long any reply
    may take, blocking reads included.

    Without one, a command sent to a Redis that stopped answering while its connection
    stays open (packets dropped, a partition, a frozen host) waits until TCP gives up,
    about 15 minutes, and the background loops behind it (relay, consumers, scheduler,
    watchdogs on Cluster) with it; redis-py before 8 sets none by default.  One timeout
    on the connections, rather than a bound at each call site, covers every command,
    pipelines, health checks and handshakes included, and redis-py drops a connection
    whose read timed out (``read_response`` disconnects before it raises), so a reply
    still in flight can never be read as the answer to the next command.  A blocking
    read answers after at most LONGEST_BLOCK; a server that takes ``connect_timeout``
    longer than that is as unavailable as one we cannot reach at start.  Pub/sub reads
    wait without a bound of their own (``timeout=math.inf``): its heartbeat watches them.
    """
    return connect_timeout + LONGEST_BLOCK


def block_ms(seconds: float) -> int:
    """The BLOCK argument (ms) of a blocking read meant to wait ``seconds``: capped at
    LONGEST_BLOCK, which the socket timeout allows for (a caller that wants to wait
    longer reads again), and never 0, which would block for good."""
    return max(1, int(min(seconds, LONGEST_BLOCK) * 1000))


def validate_name(name: str, what: str = "name") -> str:
    """Refuse names that cannot safely become part of a key."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}: "
            "use a shorter name (hash long identifiers)"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or "{" in name or "}" in name:
        raise ConfigError(
            f"{what} {name!r} contains a control character or a brace; "
            "use printable characters without '{' and '}'"
        )
    return name


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host, _, port = part.strip().rpartition(":")
        if not host:
            host, port = port, ""
        hosts.append((host.strip("[]") or "127.0.0.1", int(port) if port else default_port))
    return hosts


def _password(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def describe_redis_url(url: str) -> str:
    """``scheme://host:port[,host:port]`` (or ``unix:///path``) without credentials,
    for messages."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    hosts = ",".join(f"{h}:{p}" for h, p in _hosts(parts.netloc, 6379))
    return f"{parts.scheme}://{hosts}"


_MULTIPLEXABLE = {"host", "port", "db", "username", "password", "path", "connection_class"}


def create_multiplexed(url: str, *, connect_timeout: float = 5.0) -> MultiplexedRedis | None:
    """The hot paths' connection for a plain ``redis://`` or ``unix://`` URL, else None.

    TLS, Sentinel, Cluster and URL options it does not know stay on redis-py alone.
    """
    if urlsplit(url).scheme not in ("redis", "unix"):
        return None
    connection: dict[str, Any] = dict(parse_url(url))
    if not set(connection) <= _MULTIPLEXABLE:
        return None
    return MultiplexedRedis(
        connection, where=describe_redis_url(url), connect_timeout=connect_timeout
    )


def _check_url(url: str) -> None:
    """Refuse a URL whose port or database is not a number, before anything connects."""
    parts = urlsplit(url)
    shown = shown_url(url)
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"unsupported Redis URL scheme {parts.scheme!r} in {shown}: use "
            "redis://, rediss://, unix:///path/to/redis.sock, "
            "redis+sentinel://host:port/service or redis+cluster://host:port"
        )
    try:
        _hosts(parts.netloc, 6379)
        if parts.scheme in ("redis", "rediss"):
            # redis-py would silently ignore a database that is not a number.
            db = unquote(parts.path).strip("/")
            if db and not db.isdigit():
                raise ValueError(f"database {db!r} is not a number")
    except ValueError as exc:
        raise ConfigError(
            f"the Redis URL {shown} is invalid ({exc}): the port and the database must be "
            "numbers, as in redis://host:6379/0"
        ) from None


def create_redis_client(url: str, *, connect_timeout: float = 5.0) -> RedisClient:
    """Build a ``redis.asyncio`` client for any of the supported URL forms."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"unsupported Redis URL scheme {parts.scheme!r} in {describe_redis_url(url)}: use "
            "redis://, rediss://, unix:///path/to/redis.sock, "
            "redis+sentinel://host:port/service or redis+cluster://host:port"
        )
    timeouts: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": read_timeout(connect_timeout),
        "health_check_interval": 30,
    }
    if parts.scheme != "unix":
        # TCP only: a unix socket connection refuses the option.
        timeouts["socket_keepalive"] = True
    if parts.scheme in ("redis", "rediss", "unix"):
        # redis-py's default pool fails at once ("Too many connections") past 100
        # concurrent commands; a burst of requests should queue briefly instead and
        # only then fail (503), so the pool blocks up to connect_timeout for a slot.
        pool = BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=connect_timeout, **timeouts
        )
        return Redis.from_pool(pool)  # the client owns (and closes) its pool
    username, password = _password(parts.netloc)
    if parts.scheme == "redis+cluster":
        nodes = [ClusterNode(h, p) for h, p in _hosts(parts.netloc, 6379)]
        return RedisCluster(
            startup_nodes=nodes,
            username=username,
            password=password,
            socket_connect_timeout=connect_timeout,
            socket_timeout=read_timeout(connect_timeout),
        )
    # redis+sentinel://host:port,host:port/service_name[/db]
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigError(
            f"{describe_redis_url(url)} names no service: "
            "use redis+sentinel://host:port[,host:port]/service_name[/db]"
        )
    db = int(path[1]) if len(path) > 1 else 0
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        _hosts(parts.netloc, 26379),
        socket_timeout=connect_timeout,
        sentinel_kwargs={"socket_connect_timeout": connect_timeout, "password": password},
    )
    client: Redis = sentinel.master_for(
        path[0], db=db, username=username, password=password, **timeouts
    )
    return client


# Script calls sent through redis-py with a callback, referenced until done.
_calls: set[asyncio.Task[Any]] = set()

_INCLUDE = re.compile(r"^--! include (\w+)$", re.MULTILINE)


class Script:
    """A Lua script shipped in a package, called by SHA with a NOSCRIPT fallback.

    ``EVALSHA`` routes by the first key, so the same call works on a single
    server, behind Sentinel and on Cluster; a node that lost its script cache
    (restart, failover) gets the source once through ``EVAL``.
    """

    def __init__(self, package: str, name: str) -> None:
        self.name = f"{package}:{name}"
        files = resources.files(package)
        # A line '--! include <name>' is replaced by <name>.lua of the same package:
        # scripts share Lua functions without copies (Redis cannot call a script
        # from another).
        self.source = _INCLUDE.sub(
            lambda m: files.joinpath(f"{m[1]}.lua").read_text(),
            files.joinpath(f"{name}.lua").read_text(),
        )
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(
        self, client: ScriptClient, keys: Sequence[Any], args: Sequence[Any] = ()
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)

    def send(
        self,
        client: ScriptClient,
        keys: Sequence[Any],
        args: Sequence[Any],
        callback: ReplyCallback,
    ) -> None:
        """Send the call now; ``callback(reply, error)`` runs as its reply is read,
        whether or not anyone still waits, so a cancelled caller cannot stop a
        release half-way (NOSCRIPT falls back to EVAL).

        On the multiplexed connection the callback runs in its reader; through
        redis-py a task, kept until done, makes the call.
        """
        if not isinstance(client, MultiplexedRedis):
            task = asyncio.ensure_future(self(client, keys, args))
            _calls.add(task)
            task.add_done_callback(_calls.discard)
            task.add_done_callback(
                lambda done: (
                    callback(None, asyncio.CancelledError())
                    if done.cancelled()
                    else callback(
                        done.result() if done.exception() is None else None, done.exception()
                    )
                )
            )
            return

        def first(reply: Any, error: BaseException | None) -> None:
            if isinstance(error, redis_errors.NoScriptError):
                client.execute_command_to(callback, "EVAL", self.source, len(keys), *keys, *args)
            else:
                callback(reply, error)

        client.execute_command_to(first, "EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, client: RedisClient) -> None:
        """Load into every primary (before pipelined EVALSHA, which has no fallback)."""
        await client.script_load(self.source)


class RedisBackend:
    """The Redis connection of one Dist: client, key builder and script registry."""

    def __init__(
        self, target: str | RedisClient, *, namespace: str, connect_timeout: float = 5.0
    ) -> None:
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        if isinstance(target, str):
            _check_url(target)
            self.where = describe_redis_url(target)
            self.client: RedisClient = create_redis_client(target, connect_timeout=connect_timeout)
            self.multiplexed = create_multiplexed(target, connect_timeout=connect_timeout)
            self._owns_client = True
        elif isinstance(target, Redis | RedisCluster):
            self.where = _describe_client(target)
            self.client = target
            self.multiplexed = None  # a client the app built: all traffic goes through it
            self._owns_client = False
        else:
            raise ConfigError(
                f"redis={target!r} is invalid: pass a URL like 'redis://host:6379/0' or a "
                "redis.asyncio.Redis (or RedisCluster) client"
            )
        # Per-request scripts (sessions, locks) run here; everything else on self.client.
        self.commands: ScriptClient = self.multiplexed or self.client
        self.is_cluster = isinstance(self.client, RedisCluster)
        self._scripts: dict[tuple[str, str], Script] = {}

    def key(self, kind: str, name: str, suffix: str = "") -> str:
        """``{namespace:kind:name}`` plus an optional ``:suffix``; one slot per object."""
        tag = f"{{{self.namespace}:{kind}:{validate_name(name)}}}"
        return f"{tag}:{suffix}" if suffix else tag

    def script(self, package: str, name: str) -> Script:
        """The script ``<package>/<name>.lua``, loaded from disk once per process."""
        key = (package, name)
        script = self._scripts.get(key)
        if script is None:
            script = self._scripts[key] = Script(package, name)
        return script

    def unavailable(self, exc: BaseException) -> BackendUnavailable:
        return BackendUnavailable(
            f"Redis at {self.where} is unavailable ({type(exc).__name__}: {exc}); "
            "check that it is running and that ASGI_DIST_REDIS_URL points at it"
        )

    async def start(self) -> None:
        try:
            await asyncio.wait_for(self.client.ping(), self.connect_timeout)
            if self.multiplexed is not None:
                await asyncio.wait_for(
                    self.multiplexed.execute_command("PING"), self.connect_timeout
                )
        except (redis_errors.AuthenticationError, redis_errors.ResponseError) as exc:
            # It answered, and refused: a wrong password, user or database number.
            await self.stop()
            raise ConfigError(
                f"Redis at {self.where} refused the connection ({type(exc).__name__}: {exc}): "
                "fix the user, password or database number in the URL (Dist(redis=...) or "
                "ASGI_DIST_REDIS_URL)"
            ) from exc
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            await self.stop()
            answer = (
                f"did not answer within {self.connect_timeout:g}s"
                if isinstance(exc, TimeoutError | redis_errors.TimeoutError)
                else "is unreachable"
            )
            raise BackendUnavailable(
                f"Redis at {self.where} {answer} ({type(exc).__name__}: {exc or 'timeout'}); "
                "start it or fix the URL (Dist(redis=...) or ASGI_DIST_REDIS_URL)"
            ) from exc
        await self._check_channels()
        await self._check_eviction()
        log.debug("connected to Redis at %s", self.where)

    async def _check_eviction(self) -> None:
        """Warn at start if Redis may evict keys that have no TTL: a lock's fence
        counter is one, and fences would start again from 1 after its eviction."""
        try:
            info = await asyncio.wait_for(self.client.info("memory"), self.connect_timeout)
        except (TimeoutError, OSError, redis_errors.RedisError):
            return  # INFO may be denied (ACL): nothing to tell
        nodes = [info] if "maxmemory_policy" in info else list(info.values())  # Cluster: per node
        policies = {str(n.get("maxmemory_policy")) for n in nodes if isinstance(n, dict)}
        for policy in sorted(p for p in policies if p.startswith("allkeys")):
            log.warning(
                "Redis at %s has maxmemory-policy %s: under memory pressure it may evict "
                "any key, a lock's fence counter included (fences would then start again "
                "from 1) and live sessions; set maxmemory-policy noeviction (volatile-* "
                "never evicts the counters, which have no TTL, but may evict sessions)",
                self.where,
                policy,
            )

    async def _check_channels(self) -> None:
        """Fail at start, not at the first request, if the Redis user may not use this
        namespace's keys or pub/sub channels: Redis 7 gives a new ACL user no channels,
        and then lock releases fail and waiters are never woken."""
        ns = self.namespace
        await self._probe(
            lambda name: self.client.exists(name),
            f"may not use asgi_dist's keys ({{}}); grant them with ACL SETUSER <user> "
            f"'~{ns}*' '~{{{{{ns}*' (keys of a lock, a session or a job share a Cluster slot "
            "through a {{hash tag}}, so both forms are used)",
        )
        await self._probe(
            lambda name: self.client.publish(name, b""),
            f"may not publish to asgi_dist's channels ({{}}); locks, elections and session "
            f"caches need them: grant them with ACL SETUSER <user> '&{ns}*' '&{{{{{ns}*' (or "
            "allchannels); Redis 7 gives a new ACL user no channels (acl-pubsub-default "
            "resetchannels)",
        )

    async def _probe(self, call: Callable[[str], Awaitable[Any]], refused: str) -> None:
        """``call`` on both forms of name this namespace uses; a refusal is a ConfigError
        saying ``refused`` (its ``{}`` gets Redis's words)."""
        ns = self.namespace
        try:
            for name in (f"{ns}:probe", f"{{{ns}}}:probe"):
                await asyncio.wait_for(call(name), self.connect_timeout)
        except redis_errors.NoPermissionError as exc:
            await self.stop()
            raise ConfigError(f"the Redis user of {self.where} " + refused.format(exc)) from exc
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            await self.stop()
            raise self.unavailable(exc) from exc

    async def stop(self) -> None:
        if self.multiplexed is not None:
            await self.multiplexed.aclose()
        if self._owns_client:
            try:
                await self.client.aclose()
            except Exception:  # closing a broken connection must not mask the real error
                log.debug("error closing Redis client", exc_info=True)


def _describe_client(client: RedisClient) -> str:
    if isinstance(client, RedisCluster):
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in client.startup_nodes)
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs.get('host', 'unix')}:{kwargs.get('port', '')}"
