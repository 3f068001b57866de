"""Options are validated where they enter, and shape the cookie as documented."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asgi_dist import ConfigError, Dist
from asgi_dist.scheduling import SchedulerConfig
from asgi_dist.sessions import SessionConfig
from tests.sessions.conftest import client, set_cookie


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"cookie_name": "bad name"}, "cookie_name='bad name'"),
        ({"idle_timeout": 0}, "idle_timeout=0"),
        ({"idle_timeout": 100.0, "absolute_timeout": 50.0}, "absolute_timeout=50.0"),
        ({"max_size": 10}, "max_size=10"),
        ({"same_site": "sometimes"}, "same_site='sometimes'"),
        ({"same_site": "none", "secure": False}, "same_site='none'"),
        ({"host_prefix": True, "domain": "example.com"}, "host_prefix=True"),
        ({"path": "no-slash"}, "path='no-slash'"),
        ({"backend": "mongodb"}, "backend='mongodb'"),
        ({"regenerate_grace": -1}, "regenerate_grace=-1"),
    ],
)
def test_a_bad_option_raises_config_error_naming_it(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        SessionConfig(**options)


def test_stores_shared_across_processes_need_secret_keys_and_near_cache_needs_redis(
    redis_url: str, postgres_dsn: str
) -> None:
    with pytest.raises(ConfigError, match="secret_keys"):
        Dist(redis_url).check_serving()  # a worker that serves no request needs none
    with pytest.raises(ConfigError, match="near_cache"):
        Dist(None, postgres_dsn, secret_keys=["k" * 20], sessions=SessionConfig(near_cache=True))


async def test_the_memory_backend_signs_with_a_random_key_when_none_is_given() -> None:
    dist = Dist(None, scheduler=SchedulerConfig(enabled=False))
    async with dist:
        async with client(dist) as c:
            await c.post("/set/k/v")
            assert (await c.get("/get/k")).json()["value"] == "v"
    assert len(dist.sessions.secret_keys) == 1 and len(dist.sessions.secret_keys[0]) >= 32


async def test_cookie_attributes_follow_the_options(session_dist: Callable[..., Any]) -> None:
    dist = await session_dist(
        "memory", host_prefix=True, partitioned=True, same_site="strict", persistent=False
    )
    async with client(dist) as c:
        cookie = set_cookie(await c.post("/set/k/v"))
        assert cookie is not None
        attrs = [a.strip() for a in cookie.split(";")]
        assert attrs[0].startswith("__Host-session=")
        assert {"Path=/", "HttpOnly", "SameSite=Strict", "Partitioned", "Secure"} <= set(attrs)
        assert not any(a.startswith(("Max-Age", "Domain")) for a in attrs)
    dist = await session_dist("memory", domain="example.com", path="/app", secure=True)
    async with client(dist) as c:
        cookie = set_cookie(await c.post("/set/k/v"))
        attrs = [a.strip() for a in (cookie or "").split(";")]
        assert {"Domain=example.com", "Path=/app", "Secure"} <= set(attrs)
        assert f"Max-Age={30 * 24 * 3600}" in attrs


async def test_same_site_none_always_sends_secure_even_on_plain_http(
    session_dist: Callable[..., Any],
) -> None:
    """Browsers drop SameSite=None without Secure, and behind a TLS-terminating proxy
    the app sees http: with secure='auto' the session would never stick."""
    dist = await session_dist("memory", same_site="none")
    async with client(dist) as c:  # http://testserver
        r = await c.post("/set/k/v")
        attrs = [a.strip() for a in (set_cookie(r) or "").split(";")]
        assert {"SameSite=None", "Secure"} <= set(attrs)
        c.cookies.clear()
        c.cookies.set("session", r.cookies["session"])
        r = await c.post("/logout")
        attrs = [a.strip() for a in (set_cookie(r) or "").split(";")]
        assert {"Max-Age=0", "SameSite=None", "Secure"} <= set(attrs)
