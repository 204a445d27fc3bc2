"""A key's rules, through proxies on loopback listeners: the models it may
use, its own rate limit, and keys stored hashed.

Budgets under gzip, bursts, hang-ups and failures are in
test_key_policies.py; cost and Redis going away in test_key_costs.py. No
client key may show in a log event (the autouse ``secrets_never_logged``
fixture), an access record, an error or ``/metrics``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from conftest import timeout
from helpers import fetch, header
from policies import (
    CHAT,
    KEY_A,
    KEY_B,
    KEY_F,
    KEY_H,
    KEY_U,
    TEAM_B,
    TOKENS,
    URL,
    bearer,
    config,
    error_of,
    no_secret_in,
    sha256,
    team_a,
)
from policies import admins, secrets_never_logged  # noqa: F401 (fixtures)
from redis_server import RedisServer
from redis_server import redis_server  # noqa: F401 (a fixture)


@pytest.mark.parametrize("routes", ["target_map", "model_routes"])
@pytest_twisted.ensureDeferred
async def test_a_key_may_use_only_its_models(
    reactor, upstreams, proxies, client, access, admins, routes: str
) -> None:
    """A model outside the key's ``models`` gets a 403 ``model_not_allowed``
    in OpenAI's error shape, and nothing goes upstream; a glob's models
    pass. With routes by path only, the body's model is read all the same."""
    fake, base = await upstreams.start()
    extra = ""
    if routes == "model_routes":
        extra = f'model_routes:\n  "gpt-4o-mini": "{base}"\n  "gpt-3.5-turbo": "{base}"\n'
    proxy = await proxies.start(config(base, [team_a(more=', models: ["gpt-4o*"]'), TEAM_B],
                                       extra))
    admin = await admins(proxies.gateways[-1])
    response, body = await fetch(client, reactor, proxy + URL,
                                 {**CHAT, "model": "gpt-3.5-turbo"}, headers=bearer(KEY_A))
    assert response.code == 403
    error = error_of(body)
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_allowed")
    assert "gpt-3.5-turbo" in error["message"]
    assert len(fake.requests) == 0, "nothing went upstream"
    response, _ = await fetch(client, reactor, proxy + URL, {**CHAT, "model": "gpt-4o-mini"},
                              headers=bearer(KEY_A))
    assert response.code == 200
    assert json.loads(fake.requests[-1].body)["model"] == "gpt-4o-mini"
    response, _ = await fetch(client, reactor, proxy + URL, {**CHAT, "model": "gpt-3.5-turbo"},
                              headers=bearer(KEY_B))
    assert response.code == 200, "a key without models may use any"
    await timeout(access.wait(3), reactor)
    assert [(r["status"], r.get("error_code")) for r in access] == [
        (403, "model_not_allowed"), (200, None), (200, None)]
    refused = await admin.sample("llmproxy_key_refused_total", key="team-a",
                                 reason="model_not_allowed")
    assert refused == 1


def rate_limited(base: str, extra: str = "") -> str:
    """team-a with its own rate limit (a burst of 2), team-b under the
    global one (a burst of 3); neither refills during a test."""
    own = ", rate_limit: {rate: 0.001, burst: 2}"
    return config(base, [team_a(more=own), TEAM_B],
                  "rate_limit: {rate: 0.001, burst: 3" + extra + "}\n")


async def codes_of(client: Any, reactor: Any, proxies: list[str], key: str,
                   count: int) -> list[tuple[int, bytes, Any]]:
    """Send ``count`` requests with ``key`` in turn, spread over ``proxies``."""
    seen = []
    for i in range(count):
        response, body = await fetch(client, reactor, proxies[i % len(proxies)] + URL, CHAT,
                                     headers=bearer(key))
        seen.append((response.code, body, response))
    return seen


async def a_keys_own_rate_limit(reactor: Any, client: Any, proxies: list[str]) -> None:
    """team-a gets its own burst of 2, then 429 ``rate_limited``; team-b,
    from the same address, still has the whole global burst of 3."""
    seen = await codes_of(client, reactor, proxies, KEY_A, 3)
    assert [code for code, _, _ in seen] == [200, 200, 429]
    _, body, response = seen[-1]
    assert error_of(body)["code"] == "rate_limited"
    assert int(header(response, "retry-after")) > 0
    seen = await codes_of(client, reactor, proxies, KEY_B, 4)
    assert [code for code, _, _ in seen] == [200, 200, 200, 429]
    assert error_of(seen[-1][1])["code"] == "rate_limited"


@pytest_twisted.ensureDeferred
async def test_a_key_has_its_own_rate_limit(reactor, upstreams, proxies, client) -> None:
    """A key's ``rate_limit`` replaces the global one for it alone."""
    _, base = await upstreams.start()
    proxy = await proxies.start(rate_limited(base))
    await a_keys_own_rate_limit(reactor, client, [proxy])


@pytest_twisted.ensureDeferred
async def test_a_keys_own_rate_limit_is_shared_through_redis(
    reactor, upstreams, proxies, client, redis_server: RedisServer
) -> None:
    """Two proxies on one Redis: the key's burst is one, not one each."""
    _, base = await upstreams.start()
    shared = f', store: "{redis_server.url}", store_timeout: 2'
    first = await proxies.start(rate_limited(base, shared))
    second = await proxies.start(rate_limited(base, shared))
    for root in proxies.roots:
        await timeout(root.proxy.guard.limits.store.when_connected(), reactor)
    await a_keys_own_rate_limit(reactor, client, [first, second])


@pytest_twisted.ensureDeferred
async def test_hashed_keys_authenticate_and_never_show(
    reactor, upstreams, proxies, client, access, admins, tmp_path: Path
) -> None:
    """A key given as ``key_sha256`` in the config, and one as a
    ``sha256:<hex>`` keys file line with its policy, let their holders in
    under their names; the hashes themselves are no keys. No plain key
    shows in access records, errors, ``/budgets`` or ``/metrics``."""
    fake, base = await upstreams.start()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"sha256:{sha256(KEY_F)} name=team-f budget=1000/day models=m*\n")
    hashed = f"{{key_sha256: {sha256(KEY_H)}, name: team-h, budget: {{tokens: 1000, per: day}}}}"
    proxy = await proxies.start(config(base, [hashed], f'  keys_file: "{keys_file}"\n'))
    admin = await admins(proxies.gateways[-1])
    url = proxy + URL
    for key in (KEY_H, KEY_F):
        response, _ = await fetch(client, reactor, url, CHAT, headers=bearer(key))
        assert response.code == 200
    refusals = []
    for key in (KEY_H + "x", sha256(KEY_H), f"sha256:{sha256(KEY_F)}"):
        response, body = await fetch(client, reactor, url, CHAT, headers=bearer(key))
        assert response.code == 401
        refusals.append(body)
    response, body = await fetch(client, reactor, url, {**CHAT, "model": "gpt-4o"},
                                 headers=bearer(KEY_F))
    assert response.code == 403, "the keys file line's models hold"
    assert error_of(body)["code"] == "model_not_allowed"
    await timeout(access.wait(6), reactor)
    assert [r.get("key_name") for r in access] == ["team-h", "team-f", None, None, None,
                                                   "team-f"]
    assert len(fake.requests) == 2
    rows, budgets = await admin.budgets()
    assert rows["team-h"]["used"] == rows["team-f"]["used"] == TOKENS
    _, metrics = await admin.metrics()
    for text in [json.dumps(r, default=str) for r in access] + refusals + [budgets, metrics]:
        no_secret_in(text)
    assert all(error_of(body)["code"] == "invalid_api_key" for body in refusals)




@pytest_twisted.ensureDeferred
async def test_a_key_limited_to_models_cannot_hide_the_model(
    reactor, upstreams, proxies, client, access
) -> None:
    """A body whose model the proxy cannot read (a key written with a JSON
    escape, which the upstream decodes; a form) is refused to a key with
    ``models``, since the upstream would read a model the key may not use;
    a request without a body (listing the models) is not."""
    fake, base = await upstreams.start()
    proxy = await proxies.start(config(base, [team_a(more=', models: ["gpt-4o-mini"]')]))
    escaped = json.dumps({**CHAT, "model": "gpt-4o"}).replace('"model"', '"mod\\u0065l"')
    assert json.loads(escaped)["model"] == "gpt-4o"
    form = b"model=gpt-4o&prompt=hello"
    for body, kind in ((escaped.encode(), "application/json"),
                       (form, "application/x-www-form-urlencoded")):
        response, data = await fetch(client, reactor, proxy + URL, body,
                                     headers=bearer(KEY_A, **{"Content-Type": kind}))
        assert response.code == 403
        error = error_of(data)
        assert error["code"] == "model_not_allowed"
        assert "None" not in error["message"]
    assert len(fake.requests) == 0, "nothing went upstream"
    response, _ = await fetch(client, reactor, proxy + "/v1/models", method=b"GET",
                              headers=bearer(KEY_A))
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_a_request_without_a_body_holds_and_costs_nothing(
    reactor, upstreams, proxies, client, access, admins
) -> None:
    """Listing the models with a budgeted key: nothing is held or charged
    (it generates nothing), and a budget in dollars does not ask the list
    for a price; a body naming no model under such a budget is refused."""
    fake, base = await upstreams.start()
    team_u = f"{{key: {KEY_U}, name: team-u, budget: {{usd: 5, per: day}}}}"
    proxy = await proxies.start(config(base, [team_a("{tokens: 1000, per: day}"), team_u],
                                       'prices: {"m": {input: 1, output: 1}}\n'))
    admin = await admins(proxies.gateways[-1])
    for key in (KEY_A, KEY_U):
        response, body = await fetch(client, reactor, proxy + "/v1/models", method=b"GET",
                                     headers=bearer(key))
        assert response.code == 200
        assert json.loads(body)["object"] == "list"
    await timeout(access.wait(2), reactor)
    assert not any(r.get("usage_estimated") or r.get("total_tokens") for r in access)
    rows, _ = await admin.budgets()
    assert [(rows[n]["used"], rows[n]["reserved"]) for n in ("team-a", "team-u")] == [
        (0, 0), (0, 0)]
    no_model = {key: value for key, value in CHAT.items() if key != "model"}
    response, body = await fetch(client, reactor, proxy + URL, no_model, headers=bearer(KEY_U))
    assert response.code == 403
    error = error_of(body)
    assert error["code"] == "model_not_priced" and "None" not in error["message"]
    assert len(fake.requests) == 2
