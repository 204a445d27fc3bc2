"""Protection over loopback: client addresses, rate limits, keys, body limits,
the connection cap."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.web.client import ResponseFailed

from conftest import timeout
from helpers import collect, fetch, header, raw_connect, send
from raw_http import http

WAIT = 10.0
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


async def guarded(upstreams: Any, proxies: Any, extra: str, route: str = "") -> tuple[Any, str]:
    """A fake upstream behind a proxy with extra config."""
    upstream, base = await upstreams.start()
    target = route.replace("BASE", base) if route else f'"{base}"'
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": {target}\n  "/echo": {target}\n' + extra
    )
    return upstream, proxy


@pytest_twisted.ensureDeferred
async def test_spoofed_forwarded_for_is_ignored(reactor, upstreams, proxies, client, access):
    """X-Forwarded-For from an untrusted peer changes nothing, not even limits."""
    upstream, proxy = await guarded(upstreams, proxies, "rate_limit: {rate: 0.001, burst: 2}\n")
    statuses = []
    for i in range(4):
        response, _ = await fetch(
            client, reactor, proxy + "/v1/models", method=b"GET",
            headers={"X-Forwarded-For": f"198.51.100.{i}", "X-Real-IP": f"198.51.100.{i}"},
        )
        statuses.append(response.code)
    assert statuses == [200, 200, 429, 429]
    assert {r["client_ip"] for r in access} == {"127.0.0.1"}


@pytest_twisted.ensureDeferred
async def test_trusted_proxy_chain_names_the_client(reactor, upstreams, proxies, client, access):
    """Behind a trusted proxy the client is the right-most untrusted address."""
    upstream, proxy = await guarded(
        upstreams, proxies,
        "trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\nrate_limit: {rate: 0.001, burst: 1}\n",
    )
    first, _ = await fetch(client, reactor, proxy + "/v1/models", method=b"GET",
                           headers={"X-Forwarded-For": "203.0.113.7, 127.0.0.9"})
    again, _ = await fetch(client, reactor, proxy + "/v1/models", method=b"GET",
                           headers={"X-Forwarded-For": "203.0.113.7, 127.0.0.9"})
    other, _ = await fetch(client, reactor, proxy + "/v1/models", method=b"GET",
                           headers={"X-Forwarded-For": "203.0.113.8"})
    assert (first.code, again.code, other.code) == (200, 429, 200)
    assert [r["client_ip"] for r in access] == ["203.0.113.7", "203.0.113.7", "203.0.113.8"]


@pytest_twisted.ensureDeferred
async def test_rate_limit_answers_429_with_retry_after(reactor, upstreams, proxies, client):
    """Over the limit: 429, an OpenAI-shaped error and a whole-second Retry-After."""
    upstream, proxy = await guarded(upstreams, proxies, "rate_limit: {rate: 0.5, burst: 2}\n")
    for _ in range(2):
        response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
        assert response.code == 200
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 429
    assert header(response, "retry-after") == "2"
    error = json.loads(body)["error"]
    assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
    assert len(upstream.requests) == 2
    registry = proxies.roots[-1].metrics.registry
    assert registry.get_sample_value("llmproxy_rate_limited_total") == 1


@pytest_twisted.ensureDeferred
async def test_client_keys(reactor, upstreams, proxies, client, tmp_path: Path):
    """Missing or wrong keys get 401; plain, hashed, Bearer and x-api-key pass."""
    hashed = hashlib.sha256(b"hashed-key").hexdigest()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\nfile-key\nsha256:{hashed}\n")
    upstream, proxy = await guarded(
        upstreams, proxies, f'auth: {{keys: [inline-key], keys_file: "{keys_file}"}}\n'
    )
    url = proxy + "/v1/models"
    cases = [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"x-api-key": "inline-keyX"}, 401),
        ({"Authorization": "Bearer inline-key"}, 200),
        ({"Authorization": "bearer file-key"}, 200),
        ({"x-api-key": "hashed-key"}, 200),
    ]
    for headers, status in cases:
        response, body = await fetch(client, reactor, url, method=b"GET", headers=headers)
        assert response.code == status, headers
        if status == 401:
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
    for path in ("/healthz", "/readyz"):
        response, _ = await fetch(client, reactor, proxy + path, method=b"GET")
        assert response.code == 200


@pytest.mark.parametrize(
    "auth_header, expected",
    [
        ("bearer", ("authorization", "Bearer sk-upstream")),
        ("x-api-key", ("x-api-key", "sk-upstream")),
        ("api-key", ("api-key", "sk-upstream")),
        ("none", None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_upstream_credentials_replace_the_clients(
    reactor, upstreams, proxies, client, auth_header, expected
):
    """The client's proxy key never reaches the provider; the route's key does."""
    upstream, proxy = await guarded(
        upstreams, proxies, "auth: {keys: [client-key]}\n",
        route=f'{{urls: ["BASE"], api_key: "sk-upstream", auth_header: {auth_header}}}',
    )
    response, body = await fetch(
        client, reactor, proxy + "/echo", b"{}",
        headers={"Authorization": "Bearer client-key", "api-key": "client-key"},
    )
    assert response.code == 200
    seen = json.loads(body)["headers"]
    assert not any("client-key" in value for _, value in seen)
    credentials = [(n, v) for n, v in seen if n in ("authorization", "x-api-key", "api-key")]
    assert credentials == ([expected] if expected else [])
    assert header(response, "authorization") is None


@pytest_twisted.ensureDeferred
async def test_open_proxy_passes_client_credentials(reactor, upstreams, proxies, client):
    """Without auth or a route key, the client's own credential goes upstream."""
    upstream, proxy = await guarded(upstreams, proxies, "")
    response, body = await fetch(
        client, reactor, proxy + "/echo", b"{}", headers={"Authorization": "Bearer mine"}
    )
    assert ["authorization", "Bearer mine"] in json.loads(body)["headers"]


@pytest_twisted.ensureDeferred
async def test_declared_oversized_body_is_413_before_it_is_sent(reactor, upstreams, proxies):
    """A Content-Length over max_body_bytes is refused without reading the body."""
    upstream, proxy = await guarded(upstreams, proxies, "max_body_bytes: 1000\n")
    raw = await raw_connect(
        reactor, proxy,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n",
    )
    await raw.closed.addTimeout(WAIT, reactor)
    head, _, body = bytes(raw.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert not upstream.requests


@pytest_twisted.ensureDeferred
async def test_chunked_body_is_refused_once_past_the_limit(reactor, upstreams, proxies):
    """A chunked body gets 413 as soon as it passes max_body_bytes."""
    upstream, proxy = await guarded(upstreams, proxies, "max_body_bytes: 1000\n")
    raw = await raw_connect(
        reactor, proxy,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"258\r\n" + b"a" * 600 + b"\r\n" + b"258\r\n" + b"b" * 600 + b"\r\n",
    )
    # The client has not finished its body, yet the answer comes.
    await raw.closed.addTimeout(WAIT, reactor)
    assert bytes(raw.received).startswith(b"HTTP/1.1 413")
    assert not upstream.requests


@pytest_twisted.ensureDeferred
async def test_body_at_the_limit_passes(reactor, upstreams, proxies, client):
    """A body of exactly max_body_bytes is accepted."""
    upstream, proxy = await guarded(upstreams, proxies, "max_body_bytes: 1000\n")
    body = b'{"model": "m", "pad": "' + b"x" * 975 + b'"}'
    assert len(body) == 1000
    response, _ = await fetch(client, reactor, proxy + "/echo", body)
    assert response.code == 200




@pytest_twisted.ensureDeferred
async def test_max_connections_holds_and_a_waiting_client_is_served_later(
    reactor, upstreams, proxies
) -> None:
    """At max_connections with none idle (each holds a request in flight)
    the daemon stops accepting; it resumes on a close."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\nmax_connections: 3\n')
    site = proxies.sites[-1]
    holders = []
    for _ in range(3):
        arrived = upstream.next_request()
        holders.append(await raw_connect(
            reactor, proxy, http(b"GET", b"/v1/models", b"", b"X-Fake-Header-Delay: 30")
        ))
        await timeout(arrived, reactor)
    assert site.open_connections == 3
    # The listening port stops reading: a fourth connection waits in the
    # listen queue.
    port = proxies.ports[-1]
    assert port not in reactor.getReaders()
    waiting = await raw_connect(reactor, proxy, http(b"GET", b"/v1/models"))
    holders[0].transport.loseConnection()
    await timeout(holders[0].closed, reactor)
    await timeout(waiting.wait_for(b'"object": "list"'), reactor)
    assert site.open_connections <= 3
    registry = proxies.gateways[-1].metrics.registry
    assert registry.get_sample_value("llmproxy_max_connections_reached_total") >= 1
    for peer in [*holders[1:], waiting]:
        peer.transport.loseConnection()
        await timeout(peer.closed, reactor)
