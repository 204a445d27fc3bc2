"""Cost and Redis going away, through proxies on loopback.

Budgets under gzip, bursts, hang-ups and failures are in
test_key_policies.py; models, rate limits and hashed keys in
test_key_rules.py. Every test here also checks that no client key shows in
a log event (the autouse ``secrets_never_logged`` fixture) or an error body.
"""

from __future__ import annotations

import json
import math

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from conftest import timeout
from helpers import fetch, header, raw_connect
from llmproxy.testing.upstream import FakeUpstream
from policies import (
    CHAT,
    KEY_A,
    KEY_U,
    TOKENS,
    URL,
    Gate,
    bearer,
    config,
    error_of,
    no_secret_in,
    raw_post,
    team_a,
    tokens_of,
)
from policies import admins, secrets_never_logged  # noqa: F401 (fixtures)
from redis_server import RedisServer
from redis_server import redis_server  # noqa: F401 (a fixture)
from test_redis_store import FakeRedis, until
from test_redis_store import fake_redis  # noqa: F401 (a fixture)


#: Prices in US dollars per million tokens.
PRICES = 'prices:\n  "gpt-4o*": {input: 2.5, output: 10, cached_input: 1.25}\n'
GPT = {**CHAT, "model": "gpt-4o-mini"}
#: What the fake's answer to GPT costs: 4 prompt and 6 completion tokens.
GPT_MICROS = 4 * 2.5 + 6 * 10
#: What GPT may cost when admitted (its input, bytes / 4, and max_tokens),
#: in whole micro-dollars rounded up, as budgets count.
GPT_ASK_MICROS = math.ceil(tokens_of(len(json.dumps(GPT))) * 2.5 + GPT["max_tokens"] * 10)


class CachedAnswer(Resource):
    """An upstream answering every chat completion with 1000 prompt tokens,
    400 of them read from its cache, and 100 completion tokens."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        """The answer, as JSON."""
        request.setHeader(b"content-type", b"application/json")
        usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
                 "prompt_tokens_details": {"cached_tokens": 400}}
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"},
                  "finish_reason": "stop"}
        return json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o-cached",
                           "choices": [choice], "usage": usage}).encode()


@pytest_twisted.ensureDeferred
async def test_cost_is_in_access_records_and_metrics(
    reactor, upstreams, loopback, proxies, client, access, admins
) -> None:
    """With ``prices``, each answer's ``cost_usd`` is input, cached input and
    output tokens times their prices per million, and
    ``llmproxy_cost_usd_total`` adds them up by key and price entry."""
    _, base = await upstreams.start()
    cached = await loopback(Site(CachedAnswer()))
    routes = f'model_routes:\n  "gpt-4o-cached": "{cached}"\n  "gpt-4o-mini": "{base}"\n'
    budget = team_a("{tokens: 100000, per: day}")
    proxy = await proxies.start(config(base, [budget], PRICES + routes))
    admin = await admins(proxies.gateways[-1])
    for body in (GPT, {**GPT, "model": "gpt-4o-cached"}):
        response, _ = await fetch(client, reactor, proxy + URL, body, headers=bearer(KEY_A))
        assert response.code == 200
    await timeout(access.wait(2), reactor)
    # (600 * 2.5 + 400 * 1.25 + 100 * 10) / 1e6
    expected = [GPT_MICROS / 1e6, 0.003]
    assert [r["cost_usd"] for r in access] == pytest.approx(expected, rel=1e-9)
    assert access[1]["cached_tokens"] == 400
    cost = await admin.sample("llmproxy_cost_usd_total", key="team-a", model="gpt-4o*")
    assert cost == pytest.approx(sum(expected), rel=1e-9)
    row = await admin.budget("team-a")
    assert row["used"] == TOKENS + 1100


@pytest_twisted.ensureDeferred
async def test_a_money_budget_charges_dollars_and_refuses_when_spent(
    reactor, upstreams, proxies, client, access, admins
) -> None:
    """A budget in US dollars: answers are charged their price, ``/budgets``
    shows dollars, a request the rest cannot cover gets 429
    ``insufficient_quota``, and a model without a price gets 403
    ``model_not_priced`` with nothing sent upstream."""
    fake, base = await upstreams.start()
    usd = (GPT_MICROS + GPT_ASK_MICROS) / 1e6  # room for two answers, the second held
    team_u = f"{{key: {KEY_U}, name: team-u, budget: {{usd: {usd!r}, per: day}}}}"
    proxy = await proxies.start(config(base, [team_u], PRICES))
    admin = await admins(proxies.gateways[-1])
    codes = []
    for i in range(3):
        response, body = await fetch(client, reactor, proxy + URL, GPT, headers=bearer(KEY_U))
        codes.append(response.code)
        await timeout(access.wait(i + 1), reactor)
    assert codes == [200, 200, 429]
    error = error_of(body)
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert int(header(response, "retry-after")) > 0
    row = await admin.budget("team-u")
    assert row["budget"] == {"usd": usd, "per": "day", "reserve": 4096}
    assert (row["unit"], row["limit"], row["reserved"]) == ("usd", usd, 0)
    assert row["used"] == pytest.approx(2 * GPT_MICROS / 1e6, rel=1e-9)
    assert row["remaining"] == pytest.approx((GPT_ASK_MICROS - GPT_MICROS) / 1e6, rel=1e-9)
    spent = await admin.sample("llmproxy_budget_usd_total", key="team-u")
    assert spent == pytest.approx(2 * GPT_MICROS / 1e6, rel=1e-9)

    response, body = await fetch(client, reactor, proxy + URL, CHAT, headers=bearer(KEY_U))
    assert response.code == 403
    error = error_of(body)
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_priced")
    assert len(fake.requests) == 2, "nothing went upstream but the two answers"


def shared(base: str, url: str, on_error: str, store_timeout: float = 2.0) -> str:
    """team-a with a budget, its numbers in the Redis at ``url``."""
    store = (f'rate_limit: {{store: "{url}", store_timeout: {store_timeout}, '
             f"on_store_error: {on_error}}}\n")
    return config(base, [team_a("{tokens: 100000, per: day}")], store)


@pytest_twisted.ensureDeferred
async def test_redis_stopped_under_allow_lets_requests_through_and_settles_quietly(
    reactor, loopback, proxies, client, access, admins, redis_server: RedisServer
) -> None:
    """Redis stops while a budgeted request is upstream: that request ends
    normally (its settling fails, counted), the next ones are let through,
    and ``/budgets`` says the store is down."""
    fake = FakeUpstream(reactor)
    gate = Gate(fake)
    base = await loopback(Site(gate))
    proxy = await proxies.start(shared(base, redis_server.url, "allow"))
    store = proxies.roots[-1].proxy.guard.limits.store
    await timeout(store.when_connected(), reactor)
    admin = await admins(proxies.gateways[-1])
    gate.close()
    first = Deferred.fromCoroutine(fetch(client, reactor, proxy + URL, CHAT,
                                         headers=bearer(KEY_A)))
    await until(reactor, lambda: len(gate.held) == 1, "the request to be upstream")
    assert (await admin.budget("team-a"))["reserved"] > 0
    await redis_server.stop()
    gate.open()
    response, _ = await timeout(first, reactor)
    assert response.code == 200
    for _ in range(2):
        response, _ = await fetch(client, reactor, proxy + URL, CHAT, headers=bearer(KEY_A))
        assert response.code == 200
    await timeout(access.wait(3), reactor)
    assert [r["total_tokens"] for r in access] == [TOKENS] * 3
    errors = [await admin.sample("llmproxy_limit_store_errors_total", op=op)
              for op in ("check", "add_usage")]
    assert errors[0] >= 2 and errors[1] >= 1, errors
    rows, _ = await admin.budgets()
    assert rows["team-a"]["error"].startswith("store unavailable")


@pytest_twisted.ensureDeferred
async def test_redis_stopped_under_deny_refuses_with_503(
    reactor, upstreams, proxies, client, redis_server: RedisServer
) -> None:
    """``on_store_error: deny``: without Redis, a budgeted request is
    refused with 503 ``limit_store_unavailable`` and nothing goes upstream."""
    fake, base = await upstreams.start()
    proxy = await proxies.start(shared(base, redis_server.url, "deny"))
    await timeout(proxies.roots[-1].proxy.guard.limits.store.when_connected(), reactor)
    await redis_server.stop()
    response, body = await fetch(client, reactor, proxy + URL, CHAT, headers=bearer(KEY_A))
    assert response.code == 503
    assert error_of(body)["code"] == "limit_store_unavailable"
    assert int(header(response, "retry-after")) > 0
    assert len(fake.requests) == 0


@pytest.mark.parametrize("on_error, code", [("allow", 200), ("deny", 503)])
@pytest_twisted.ensureDeferred
async def test_a_silent_redis_holds_nothing_up(
    reactor, upstreams, proxies, client, access, admins, fake_redis: FakeRedis,
    on_error: str, code: int,
) -> None:
    """A Redis that takes commands and never answers: each request is
    answered as ``on_store_error`` says once ``store_timeout`` is up, its
    record is written and ``/budgets`` answers, saying the store is down."""
    _, base = await upstreams.start()
    proxy = await proxies.start(shared(base, fake_redis.url, on_error, store_timeout=0.1))
    await timeout(proxies.roots[-1].proxy.guard.limits.store.when_connected(), reactor)
    admin = await admins(proxies.gateways[-1])
    for i in range(2):
        response, body = await fetch(client, reactor, proxy + URL, CHAT, headers=bearer(KEY_A))
        assert response.code == code
        no_secret_in(body)
        await timeout(access.wait(i + 1), reactor)
    assert fake_redis.commands, "the store was asked"
    rows, _ = await admin.budgets()
    assert rows["team-a"]["error"].startswith("store unavailable")


@pytest_twisted.ensureDeferred
async def test_a_hold_the_store_grants_after_the_client_left_is_let_go(
    reactor, upstreams, proxies, access, fake_redis: FakeRedis
) -> None:
    """The client hangs up while Redis has not answered its reservation
    yet: once Redis grants the hold, the proxy lets it go at once (charging
    nothing), and nothing goes upstream."""
    fake, base = await upstreams.start()
    proxy = await proxies.start(shared(base, fake_redis.url, "allow", store_timeout=5))
    await timeout(proxies.roots[-1].proxy.guard.limits.store.when_connected(), reactor)
    sent = len(fake_redis.commands)
    leaving = await raw_connect(reactor, proxy, raw_post(URL, CHAT, bearer(KEY_A)))
    await until(reactor, lambda: len(fake_redis.commands) > sent, "the reservation")
    reserve = fake_redis.commands[sent]
    leaving.transport.abortConnection()
    await timeout(access.wait(1), reactor)
    assert access[0]["outcome"] == "client_closed"
    # Granted: admitted, nothing used, this hold the only one.
    hold = reserve[7]
    fake_redis.connections[-1].transport.write(b"*3\r\n:1\r\n:0\r\n:" + hold + b"\r\n")
    await until(reactor, lambda: len(fake_redis.commands) > sent + 1, "the hold to be let go")
    settle = fake_redis.commands[sent + 1]
    # [EVAL, script, 3, the budget's three keys, the hold's id, ...]; a
    # settle's next argument is the charge.
    assert settle[3:6] == reserve[3:6], "the same budget's keys"
    assert settle[6:8] == [reserve[6], b"0"], "that hold, charged nothing"
    assert len(fake.requests) == 0
