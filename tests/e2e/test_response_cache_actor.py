"""The ResponseCache deployment in a real Ray Serve application, called through handles."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from ray import serve
from ray.serve import Deployment
from ray.serve.handle import DeploymentHandle

from serve_app.clients.response_cache import ResponseCacheClient
from serve_app.config import ResponseCacheConfig
from serve_app.deployments.response_cache import ResponseCache
from serve_app.stores.response_store import CachedChoice, CachedResponse, CacheStats, cache_key

APP = "cache-test"
CACHE = cast(Deployment, ResponseCache)  # mypy ignores what a class decorator returns


pytestmark = pytest.mark.usefixtures("ray_cluster")


def deploy(
    config: ResponseCacheConfig, user_config: dict[str, int] | None = None
) -> DeploymentHandle:
    deployment = CACHE.options(user_config=user_config) if user_config else CACHE
    return serve.run(deployment.bind(config), name=APP, route_prefix=None)


def response(text: str) -> CachedResponse:
    choice = CachedChoice(text=text, finish_reason="length", token_ids=[5, 6, 7])
    return CachedResponse(choices=[choice], prompt_tokens=4, completion_tokens=3)


def test_put_then_get_through_the_handle() -> None:
    handle = deploy(ResponseCacheConfig())
    handle.put.remote("k", response("hello")).result()
    assert handle.get.remote("k").result() == response("hello")
    assert handle.get.remote("other").result() is None
    stats: CacheStats = handle.stats.remote().result()
    assert (stats.entries, stats.hits, stats.misses) == (1, 1, 1)


async def live_version_reaches(client: ResponseCacheClient, version: str | None) -> None:
    """Wait for the client's long poll to deliver ``version``."""
    for _ in range(100):
        if client.live_version == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the client still follows {client.live_version!r}, not {version!r}")


def test_client_finds_answers_of_the_live_version_only() -> None:
    handle = deploy(ResponseCacheConfig())
    client = ResponseCacheClient(handle)
    request = {"prompt": "k", "temperature": 0}

    async def exercise() -> list[CachedResponse | None]:
        await client.store("v1", request, response("from v1"))
        before_any_version = await client.lookup(request)
        await handle.set_live_version.remote("v1")
        await live_version_reaches(client, "v1")
        live = await client.lookup(request)
        absent = await client.lookup({"prompt": "absent", "temperature": 0})
        await handle.set_live_version.remote("v2")
        await live_version_reaches(client, "v2")
        after_swap = await client.lookup(request)
        return [before_any_version, live, absent, after_swap]

    assert asyncio.run(exercise()) == [None, response("from v1"), None, None]
    assert (client.hits, client.misses, client.errors) == (1, 3, 0)


def test_a_repeated_hit_is_answered_by_the_near_cache_without_a_call() -> None:
    handle = deploy(ResponseCacheConfig())
    client = ResponseCacheClient(handle)
    request = {"prompt": "k", "temperature": 0}

    async def exercise() -> list[CachedResponse | None]:
        await handle.set_live_version.remote("v1")
        await client.lookup(request)  # starts following the live version
        await live_version_reaches(client, "v1")
        await handle.put.remote(cache_key("v1", request), response("stored elsewhere"))
        await client.store("v1", {"prompt": "mine", "temperature": 0}, response("mine"))
        answers = [await client.lookup(request) for _ in range(3)]
        answers.append(await client.lookup({"prompt": "mine", "temperature": 0}))
        await handle.reconfigure.remote({"enabled": False})
        await live_version_reaches(client, None)  # a disabled cache empties the near cache
        answers.append(await client.lookup(request))
        return answers

    answers = asyncio.run(exercise())
    assert answers == [response("stored elsewhere")] * 3 + [response("mine"), None]
    assert (client.hits, client.near_hits) == (4, 3)  # only the first lookup made a call
    stats: CacheStats = handle.stats.remote().result()
    assert stats.hits == 1


def test_user_config_bounds_apply_when_the_replica_starts() -> None:
    handle = deploy(ResponseCacheConfig(max_entries=100), user_config={"max_entries": 2})
    for key in "abc":
        handle.put.remote(key, response(key)).result()
    stats: CacheStats = handle.stats.remote().result()
    assert (stats.entries, stats.evictions) == (2, 1)
    assert handle.get.remote("a").result() is None


def test_shrinking_max_entries_live_evicts_at_once() -> None:
    # serve.run always starts fresh replicas (imperative deploys get a new code version), so the
    # in-place user_config update that `serve deploy` performs is driven here by calling
    # reconfigure, the method Serve calls with the new user_config.
    handle = deploy(ResponseCacheConfig(), user_config={"max_entries": 10})
    for key in "abc":
        handle.put.remote(key, response(key)).result()
    handle.reconfigure.remote({"max_entries": 1}).result()
    stats: CacheStats = handle.stats.remote().result()
    assert (stats.entries, stats.evictions) == (1, 2)
    assert handle.get.remote("c").result() == response("c")
    assert handle.get.remote("a").result() is None


def test_client_degrades_to_a_miss_when_the_cache_is_gone() -> None:
    client = ResponseCacheClient(deploy(ResponseCacheConfig()), timeout_s=0.5)
    serve.delete(APP)

    async def exercise() -> CachedResponse | None:
        await client.store("v1", {"prompt": "k"}, response("never stored"))
        return await client.lookup({"prompt": "k"})

    assert asyncio.run(exercise()) is None
    assert client.errors == 2
    assert (client.hits, client.misses) == (0, 0)
