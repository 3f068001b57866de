from asgi_dist import Dist


async def test_dist_starts_and_stops_on_shared_servers(make_dist) -> None:
    dist: Dist = await make_dist()
    assert dist.started
    await dist.stop()
    assert not dist.started
