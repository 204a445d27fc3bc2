"""Budgets that hold, through proxies on loopback listeners.

Each way a key used to get past its budget is tried as a client would: an
upstream that gzips, many requests at once (in one proxy, and across two
proxies on one Redis), a client that hangs up, a request that fails. A key's
other rules (its models, its own rate limit, a hashed key) are in
test_key_rules.py; cost and Redis going away in test_key_costs.py.

No test waits on the wall clock to show that something did not happen:
requests admitted together are held at a :class:`~policies.Gate` until
every other one has been answered, and each wait is for the event itself.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.resource import EncodingResourceWrapper
from twisted.web.server import GzipEncoderFactory, Site

from conftest import timeout
from helpers import fetch, header, raw_connect
from llmproxy.testing.upstream import FakeUpstream
from policies import (
    CHAT,
    KEY_A,
    TOKENS,
    URL,
    Gate,
    ask,
    bearer,
    config,
    error_of,
    raw_post,
    team_a,
    tokens_of,
)
from policies import admins, secrets_never_logged  # noqa: F401 (fixtures)
from redis_server import RedisServer, free_port
from redis_server import redis_server  # noqa: F401 (a fixture)
from test_redis_store import until


@pytest_twisted.ensureDeferred
async def test_a_gzipped_answer_is_passed_on_as_sent_and_charged(
    reactor, loopback, proxies, client, access, admins
) -> None:
    """An upstream that gzips (the OpenAI SDK asks for it): the client gets
    the gzipped bytes the upstream sent, and the key is charged the usage
    inside them, exactly, request after request."""
    fake = FakeUpstream(reactor)
    base = await loopback(Site(EncodingResourceWrapper(fake, [GzipEncoderFactory()])))
    proxy = await proxies.start(config(base, [team_a("{tokens: 100000, per: day}")]))
    admin = await admins(proxies.gateways[-1])
    for _ in range(10):
        response, body = await fetch(client, reactor, proxy + URL, CHAT,
                                     headers=bearer(KEY_A, **{"Accept-Encoding": "gzip"}))
        assert response.code == 200
        assert header(response, "content-encoding") == "gzip"
        assert fake.requests[-1].headers.getRawHeaders(b"accept-encoding") == [b"gzip"]
        inflated = gzip.decompress(body)
        assert json.loads(inflated)["usage"]["total_tokens"] == TOKENS
        # The bytes Twisted's gzip encoder made of the fake's one write.
        deflater = zlib.compressobj(GzipEncoderFactory.compressLevel, zlib.DEFLATED, 31)
        assert body == deflater.compress(inflated) + deflater.flush()
    await timeout(access.wait(10), reactor)
    assert [r["total_tokens"] for r in access] == [TOKENS] * 10
    assert not any(r.get("usage_estimated") for r in access)
    row = await admin.budget("team-a")
    assert (row["used"], row["reserved"]) == (10 * TOKENS, 0)


@pytest.mark.parametrize("asked, sent", [(True, b"gzip"), (False, b"identity")])
@pytest_twisted.ensureDeferred
async def test_a_gzipped_stream_is_charged(
    reactor, loopback, proxies, client, access, admins, asked: bool, sent: bytes
) -> None:
    """A budgeted stream from an upstream that gzips: when the client asked
    for the usage, the gzipped stream passes as sent and its usage is read
    inside; when the proxy asks for it, it asks for a plain stream, whose
    usage event it takes out."""
    fake = FakeUpstream(reactor)
    base = await loopback(Site(EncodingResourceWrapper(fake, [GzipEncoderFactory()])))
    proxy = await proxies.start(config(base, [team_a("{tokens: 100000, per: day}")]))
    admin = await admins(proxies.gateways[-1])
    body: dict[str, Any] = {**CHAT, "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    response, data = await fetch(client, reactor, proxy + URL, body,
                                 headers=bearer(KEY_A, **{"Accept-Encoding": "gzip"}))
    assert response.code == 200
    assert fake.requests[-1].headers.getRawHeaders(b"accept-encoding") == [sent]
    if asked:
        assert header(response, "content-encoding") == "gzip"
        data = gzip.decompress(data)
    assert (b'"usage"' in data) is asked
    await timeout(access.wait(1), reactor)
    assert access[0]["total_tokens"] == TOKENS and not access[0].get("usage_estimated")
    assert (await admin.budget("team-a"))["used"] == TOKENS


#: Requests that fit in what is left of the budget in the burst tests.
FITS = 3


async def burst(
    reactor: Any, client: Any, gate: Gate, proxies: list[str], count: int
) -> tuple[int, list[tuple[Any, bytes]]]:
    """Send ``count`` requests from team-a at once, spread over ``proxies``.

    The gate is closed: every request is either refused by the proxy or
    held at the gate. Once all of them are one or the other, the gate
    opens.

    Returns:
        How many were held at the gate, and every ``(response, body)``.
    """
    gate.close()
    answered: list[Any] = []
    pending = []
    for i in range(count):
        sent = Deferred.fromCoroutine(fetch(client, reactor, proxies[i % len(proxies)] + URL,
                                            CHAT, headers=bearer(KEY_A)))
        pending.append(sent.addCallback(lambda done: answered.append(done) or done))
    await until(reactor, lambda: len(gate.held) + len(answered) == count,
                "each request to be refused or held upstream")
    held = len(gate.held)
    assert all(response.code == 429 for response, _ in answered)
    gate.open()
    return held, await timeout(gatherResults(pending), reactor)


async def a_burst_gets_what_fits(
    reactor: Any, client: Any, access: Any, admin: Any, fake: FakeUpstream, gate: Gate,
    proxies: list[str],
) -> None:
    """One request, then 20 at once against what is left of team-a's budget
    (FITS asks and a token short of one more): FITS are admitted."""
    response, _ = await fetch(client, reactor, proxies[0] + URL, CHAT, headers=bearer(KEY_A))
    assert response.code == 200
    await timeout(access.wait(1), reactor)

    async def charged(tokens: int) -> bool:
        row = await admin.budget("team-a")
        return row["used"] == tokens and row["reserved"] == 0

    await until(reactor, lambda: charged(TOKENS), "the first request to be charged")
    held, answers = await burst(reactor, client, gate, proxies, 20)
    assert held == FITS
    codes = [response.code for response, _ in answers]
    assert codes.count(200) == FITS and codes.count(429) == 20 - FITS, codes
    for response, body in answers:
        if response.code == 429:
            assert error_of(body)["code"] == "insufficient_quota"
            assert int(header(response, "retry-after")) > 0
    assert len(fake.requests) == 1 + FITS, "only what was admitted went upstream"
    await timeout(access.wait(21), reactor)
    await until(reactor, lambda: charged((1 + FITS) * TOKENS), "the burst to be charged")


def nearly_spent(base: str, extra: str = "") -> str:
    """team-a's budget: one request, FITS asks, and one token short of
    another ask."""
    tokens = TOKENS + FITS * ask(CHAT) + ask(CHAT) - 1
    return config(base, [team_a(f"{{tokens: {tokens}, per: day}}")], extra)


async def gated_upstream(reactor: Any, loopback: Any) -> tuple[FakeUpstream, Gate, str]:
    """A fake upstream behind an open gate, on loopback; its base URL."""
    fake = FakeUpstream(reactor)
    gate = Gate(fake)
    return fake, gate, await loopback(Site(gate))


@pytest_twisted.ensureDeferred
async def test_twenty_requests_at_once_admit_only_what_fits(
    reactor, loopback, proxies, client, access, admins
) -> None:
    """In one proxy: each admitted request holds its ask while it runs, so
    that only what the rest of the budget covers is admitted."""
    fake, gate, base = await gated_upstream(reactor, loopback)
    proxy = await proxies.start(nearly_spent(base))
    admin = await admins(proxies.gateways[-1])
    await a_burst_gets_what_fits(reactor, client, access, admin, fake, gate, [proxy])


@pytest_twisted.ensureDeferred
async def test_twenty_requests_at_once_through_two_proxies_on_one_redis(
    reactor, loopback, proxies, client, access, admins, redis_server: RedisServer
) -> None:
    """Two proxies reserving in one Redis cannot both take the last of a
    budget: the burst, spread over both, gets what fits and no more."""
    fake, gate, base = await gated_upstream(reactor, loopback)
    shared = f'rate_limit: {{store: "{redis_server.url}", store_timeout: 2}}\n'
    first = await proxies.start(nearly_spent(base, shared))
    second = await proxies.start(nearly_spent(base, shared))
    for root in proxies.roots:
        await timeout(root.proxy.guard.limits.store.when_connected(), reactor)
    admin = await admins(proxies.gateways[-1])
    await a_burst_gets_what_fits(reactor, client, access, admin, fake, gate, [first, second])


@pytest_twisted.ensureDeferred
async def test_a_client_hanging_up_mid_stream_is_charged_an_estimate(
    reactor, upstreams, proxies, access, admins
) -> None:
    """A budgeted stream cut off by its client: the upstream is cancelled,
    and the key is charged the input and the text streamed so far (never
    more than ``max_tokens``), marked as an estimate."""
    fake, base = await upstreams.start()
    proxy = await proxies.start(config(base, [team_a("{tokens: 100000, per: day}")]))
    admin = await admins(proxies.gateways[-1])
    body = {**CHAT, "stream": True, "max_tokens": 50}
    slow = {"X-Fake-Chunks": "6", "X-Fake-Chunk-Delay": "0.5"}
    streaming = await raw_connect(reactor, proxy, raw_post(URL, body, bearer(KEY_A, **slow)))
    await timeout(streaming.wait_for(b"Hello"), reactor)  # the first piece of text
    streaming.transport.abortConnection()
    await timeout(access.wait(1), reactor)
    assert await timeout(fake.requests[-1].done, reactor) == "disconnected"
    record = access[0]
    assert record["outcome"] == "client_closed"
    assert record["usage_estimated"] is True
    assert record["prompt_tokens"] == tokens_of(len(json.dumps(body)))
    assert 0 < record["completion_tokens"] <= 50
    charged = record["prompt_tokens"] + record["completion_tokens"]
    row = await admin.budget("team-a")
    assert (row["used"], row["reserved"]) == (charged, 0)
    estimated = await admin.sample("llmproxy_budget_estimated_tokens_total", key="team-a")
    assert estimated == charged


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_before_the_answer_is_charged_its_whole_ask(
    reactor, upstreams, proxies, access, admins
) -> None:
    """A whole-answer request dropped while the upstream works on it: the
    upstream is cancelled and the key is charged its input and all of its
    ``max_tokens`` (the upstream generates blind)."""
    fake, base = await upstreams.start()
    proxy = await proxies.start(config(base, [team_a("{tokens: 100000, per: day}")]))
    admin = await admins(proxies.gateways[-1])
    arrived = fake.next_request()
    waiting = await raw_connect(
        reactor, proxy, raw_post(URL, CHAT, bearer(KEY_A, **{"X-Fake-Header-Delay": "60"}))
    )
    upstream_request = await timeout(arrived, reactor)
    waiting.transport.abortConnection()
    await timeout(access.wait(1), reactor)
    assert await timeout(upstream_request.done, reactor) == "disconnected"
    record = access[0]
    assert (record["outcome"], record["usage_estimated"]) == ("client_closed", True)
    assert record["prompt_tokens"] == tokens_of(len(json.dumps(CHAT)))
    assert record["completion_tokens"] == CHAT["max_tokens"]
    row = await admin.budget("team-a")
    assert (row["used"], row["reserved"]) == (ask(CHAT), 0)


@pytest_twisted.ensureDeferred
async def test_a_failed_request_lets_go_of_its_reservation(
    reactor, upstreams, proxies, client, access, admins
) -> None:
    """An upstream that refuses connections (502), or answers an error
    without usage: nothing is charged, nothing stays held, and a request
    needing the whole budget is admitted after them."""
    fake, base = await upstreams.start()
    closed = f"http://127.0.0.1:{await free_port(reactor)}"  # nothing listens there
    dead = {**CHAT, "model": "d"}  # as long as CHAT: the same ask
    routes = f'model_routes:\n  "d": "{closed}"\n  "m": "{base}"\n'
    proxy = await proxies.start(config(base, [team_a(f"{{tokens: {ask(CHAT)}, per: day}}")],
                                       routes))
    admin = await admins(proxies.gateways[-1])
    response, body = await fetch(client, reactor, proxy + URL, dead, headers=bearer(KEY_A))
    assert response.code == 502
    error_of(body)
    response, body = await fetch(client, reactor, proxy + URL, CHAT,
                                 headers=bearer(KEY_A, **{"X-Fake-Status": "400"}))
    assert response.code == 400
    await timeout(access.wait(2), reactor)
    row = await admin.budget("team-a")
    assert (row["used"], row["reserved"]) == (0, 0)
    response, _ = await fetch(client, reactor, proxy + URL, CHAT, headers=bearer(KEY_A))
    assert response.code == 200
    await timeout(access.wait(3), reactor)
    row = await admin.budget("team-a")
    assert (row["used"], row["reserved"]) == (TOKENS, 0)
    assert len(fake.requests) == 2
