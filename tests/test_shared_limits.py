"""Many processes, one gateway: rate limits and budgets shared through Redis.

Each test starts its own redis-server on a loopback port (tests/redis_server.py)
and two proxies in this process, each with its own connection to it: what
holds across them holds across workers and instances.

No test sleeps to let something happen: each waits, bounded, for the event
itself (the store connected again, the usage counted in Redis).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from conftest import timeout
from helpers import fetch, header
from llmproxy.limits import RedisStore, budget_window
from redis_server import RedisServer
from redis_server import redis_server  # noqa: F401 (a fixture)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "one two three four"}],
        "max_tokens": 6}
TOKENS = 4 + 6  # the fake upstream's usage for CHAT
#: What a budgeted CHAT holds while it runs: its input (bytes / 4) and
#: max_tokens.
ASK = -(-len(json.dumps(CHAT)) // 4) + 6


def shared_config(base: str, store: str, extra: str = "", rate: str = "0.001") -> str:
    """A proxy limited to ``rate`` requests/s (burst 5) per client, in ``store``."""
    return (
        f'target_map:\n  "/v1/": "{base}"\n'
        f'rate_limit: {{rate: {rate}, burst: 5, store: "{store}", store_timeout: 0.5'
        f"{extra}}}\n"
    )


async def codes(client: Any, reactor: Any, urls: list[str], **kw: Any) -> list[int]:
    """Send one chat completion to each URL in turn; their status codes."""
    seen = []
    for url in urls:
        response, _ = await fetch(client, reactor, url + "/v1/chat/completions", CHAT, **kw)
        seen.append(response.code)
    return seen


def store_of(proxies: Any) -> RedisStore:
    """The Redis store of the proxy started last."""
    store = proxies.roots[-1].proxy.guard.limits.store
    assert isinstance(store, RedisStore)
    return store


async def limited_again(client: Any, reactor: Any, url: str, store: RedisStore) -> None:
    """Once ``store`` has connected again, the burst of 5 passes and no more.

    Redis starts empty: a fresh bucket of 5.
    """
    await timeout(store.when_connected(), reactor)
    assert await codes(client, reactor, [url] * 6) == [200] * 5 + [429]


async def counted(reactor: Any, redis_server: RedisServer, key: str, tokens: int) -> None:
    """Wait until Redis counts ``tokens`` in ``key`` (asking it each time)."""

    async def asking() -> None:
        while await redis_server.command("GET", key) != str(tokens).encode():
            pass

    await timeout(Deferred.fromCoroutine(asking()), reactor)


@pytest_twisted.ensureDeferred
async def test_two_proxies_share_one_clients_rate_limit(
    reactor, upstreams, proxies, client, redis_server
) -> None:
    """Spread over two proxies, one client gets the burst once, not twice."""
    _, base = await upstreams.start()
    first = await proxies.start(shared_config(base, redis_server.url))
    second = await proxies.start(shared_config(base, redis_server.url))
    seen = await codes(client, reactor, [first, second] * 6)
    assert seen.count(200) == 5 and seen.count(429) == 7, seen
    assert seen[:5] == [200] * 5


@pytest_twisted.ensureDeferred
async def test_two_proxies_share_a_keys_budget(
    reactor, upstreams, proxies, client, redis_server, access
) -> None:
    """A budget spent through one proxy is spent through the other."""
    _, base = await upstreams.start()
    keys = (
        "auth:\n  keys:\n"
        f"    - {{key: key-a, name: team-a, budget: {{tokens: {TOKENS + ASK}, per: day}}}}\n"
        "    - {key: key-b, name: team-b, budget: {tokens: 1000000, per: day}}\n"
    )
    config = shared_config(base, redis_server.url, rate="1000") + keys
    first, second = await proxies.start(config), await proxies.start(config)
    team_a = {"Authorization": "Bearer key-a"}
    assert await codes(client, reactor, [first, second], headers=team_a) == [200, 200]
    await timeout(access.wait(2), reactor)
    # The usage is added when each response ends, through both proxies'
    # connections: wait until Redis has counted both.
    window, _ = budget_window("day", reactor.seconds())
    await counted(reactor, redis_server, f"llmproxy:budget:team-a:{window}", 2 * TOKENS)
    response, body = await fetch(client, reactor, first + "/v1/chat/completions", CHAT,
                                 headers=team_a)
    assert response.code == 429
    assert json.loads(body)["error"]["type"] == "insufficient_quota"
    assert int(header(response, "retry-after")) > 0
    team_b = {"Authorization": "Bearer key-b"}
    assert await codes(client, reactor, [second], headers=team_b) == [200]


@pytest.mark.parametrize("on_error, expected", [("allow", 200), ("deny", 503)])
@pytest_twisted.ensureDeferred
async def test_redis_stopped_then_started_again(
    reactor, upstreams, proxies, client, redis_server, on_error: str, expected: int
) -> None:
    """Redis down: allow lets through, deny answers 503; back up: limits hold."""
    _, base = await upstreams.start()
    proxy = await proxies.start(
        shared_config(base, redis_server.url, f", on_store_error: {on_error}")
    )
    assert (await codes(client, reactor, [proxy] * 6))[-1] == 429
    store = store_of(proxies)
    await redis_server.stop()
    seen = await codes(client, reactor, [proxy] * 3)
    assert seen == [expected] * 3
    assert not store.connected
    registry = proxies.roots[-1].metrics.registry
    assert registry.get_sample_value("llmproxy_limit_store_errors_total", {"op": "check"}) >= 3
    if expected == 503:
        response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
        assert json.loads(body)["error"]["code"] == "limit_store_unavailable"
    await redis_server.start()  # empty again: a fresh bucket of 5
    await limited_again(client, reactor, proxy, store)


@pytest_twisted.ensureDeferred
async def test_a_daemon_starts_while_redis_is_down(
    reactor, upstreams, proxies, client, redis_server
) -> None:
    """No Redis at startup: requests are served; the limit holds once it is up."""
    _, base = await upstreams.start()
    await redis_server.stop()
    proxy = await proxies.start(shared_config(base, redis_server.url))
    assert await codes(client, reactor, [proxy] * 7) == [200] * 7
    await redis_server.start()
    await limited_again(client, reactor, proxy, store_of(proxies))


@pytest_twisted.ensureDeferred
async def test_a_budget_value_of_the_wrong_type_is_a_store_error(
    reactor, upstreams, proxies, client, redis_server
) -> None:
    """Garbage in Redis is handled as "store down" (allowed), never a crash."""
    _, base = await upstreams.start()
    config = shared_config(base, redis_server.url, rate="1000") + (
        "auth:\n  keys:\n    - {key: key-a, name: team-a, budget: {tokens: 10, per: day}}\n"
    )
    proxy = await proxies.start(config)
    window, _ = budget_window("day", reactor.seconds())
    await redis_server.command("SET", f"llmproxy:budget:team-a:{window}", "not-a-number")
    response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT,
                              headers={"Authorization": "Bearer key-a"})
    assert response.code == 200
    registry = proxies.roots[-1].metrics.registry
    assert registry.get_sample_value("llmproxy_limit_store_errors_total", {"op": "check"}) >= 1
