"""The holes an outside probe found, closed: hostile clients, broken upstreams.

Each test runs the whole proxy on loopback and talks to it over raw sockets
where a well-behaved client library would hide what happens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol

from conftest import timeout
from helpers import fetch, header
from raw_http import Peer, http
from test_tap import WAIT, free_port, spawn_twistd

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


class _Scripted(Protocol):
    """Reads one request head, then plays its server's script."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        self.server.requests += 1
        self.transport.write(self.server.answer)
        if self.server.close:
            self.transport.loseConnection()
        self.buffer = b""


class ScriptedServer(Factory):
    """An upstream that answers every request with the same bytes.

    Attributes:
        requests: Requests received.
    """

    def __init__(self, answer: bytes, close: bool) -> None:
        self.answer = answer
        self.close = close
        self.requests = 0

    def buildProtocol(self, addr: Any) -> _Scripted:
        return _Scripted(self)


@pytest.fixture
def scripted(loopback: Any) -> Any:
    """A factory of scripted raw upstreams on loopback."""

    async def start(answer: bytes, close: bool = True) -> tuple[ScriptedServer, str]:
        server = ScriptedServer(answer, close)
        return server, await loopback(server)

    return start


async def connect(reactor: Any, url: str) -> Peer:
    """A raw connection to ``url``'s host and port."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    peer = Peer(reactor)
    port = int(url.rsplit(":", 1)[1])
    await timeout(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer), reactor)
    return peer


def status_line(data: bytes) -> bytes:
    """The first line of a response."""
    return data.split(b"\r\n", 1)[0]


def json_error(data: bytes) -> dict[str, Any]:
    """The OpenAI-shaped error in a raw response."""
    return json.loads(data.partition(b"\r\n\r\n")[2])["error"]


# -- 1. slow clients and max_connections -----------------------------------


@pytest_twisted.ensureDeferred
async def test_max_connections_holds_and_a_waiting_client_is_served_later(
    reactor, upstreams, proxies
) -> None:
    """At max_connections with none idle (each holds a request in flight)
    the daemon stops accepting; it resumes on a close."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\nmax_connections: 3\n')
    site = proxies.sites[-1]
    holders = [await connect(reactor, proxy) for _ in range(3)]
    for peer in holders:
        arrived = upstream.next_request()
        peer.transport.write(http(b"GET", b"/v1/models", b"", b"X-Fake-Header-Delay: 30"))
        await timeout(arrived, reactor)
    assert site.open_connections == 3
    # The listening port stops reading: a fourth connection waits in the
    # listen queue.
    port = proxies.ports[-1]
    assert port not in reactor.getReaders()
    waiting = await connect(reactor, proxy)
    waiting.transport.write(http(b"GET", b"/v1/models"))
    holders[0].transport.loseConnection()
    await timeout(holders[0].closed, reactor)
    await timeout(waiting.wait_for(b'"object": "list"'), reactor)
    assert site.open_connections <= 3
    registry = proxies.gateways[-1].metrics.registry
    assert registry.get_sample_value("llmproxy_max_connections_reached_total") >= 1
    for peer in [*holders[1:], waiting]:
        peer.transport.loseConnection()
        await timeout(peer.closed, reactor)


# -- 2. a body that could take the process ------------------------------------


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest_twisted.ensureDeferred
async def test_a_huge_body_of_tiny_objects_routes_by_its_last_model(
    reactor, upstreams, client, tmp_path: Path
) -> None:
    """16 MiB of tiny objects with ``model`` last: routed by it, memory bounded."""
    default, default_base = await upstreams.start()
    big, big_base = await upstreams.start()
    port = free_port()
    config = tmp_path / "config.yml"
    config.write_text(
        f'listen: "tcp:{port}:interface=127.0.0.1"\nadmin_listen: null\n'
        f'log: {{file: null, access: false}}\nmax_body_bytes: 33554432\n'
        f'target_map:\n  "/v1/": "{default_base}"\n'
        f'model_routes:\n  "big-model": "{big_base}"\n'
    )
    process = spawn_twistd(reactor, config, tmp_path)
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        response, _ = await fetch(client, reactor, url, CHAT)  # warm up
        assert response.code == 200
        before = _peak_rss_mb(process.transport.pid)
        size = 16 * 1024 * 1024
        body = b'{"messages": [' + b"{}," * (size // 3) + b'{}], "model": "big-model"}'
        response, _ = await fetch(client, reactor, url, body,
                                  headers={"Content-Type": "application/json"})
        assert response.code == 200
        assert big.requests and len(big.requests[-1].body) == len(body)
        assert not any(len(r.body) == len(body) for r in default.requests)
        grown = _peak_rss_mb(process.transport.pid) - before
        assert grown < 5 * size / 2**20, f"peak RSS grew by {grown:.0f} MB"
    finally:
        process.transport.signalProcess("TERM")
        await process.ended.addTimeout(WAIT, reactor)


# -- 3. upstream head, then death ---------------------------------------------


HEAD_THEN_DEATH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_head_then_close_is_a_502_with_one_upstream(
    reactor, scripted, proxies, client, access
) -> None:
    """A head and no body is a failure before the first byte, recorded so."""
    _, base = await scripted(HEAD_THEN_DEATH)
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 502, body
    assert json.loads(body)["error"]["type"] == "upstream_error"
    assert header(response, "content-type") == "application/json"
    await timeout(access.wait(1), reactor)
    assert access[0]["status"] == 502


@pytest_twisted.ensureDeferred
async def test_head_then_close_is_retried_on_another_upstream(
    reactor, scripted, upstreams, proxies, client, access
) -> None:
    """With a second upstream the client gets its answer, on attempt 2."""
    dying, dying_base = await scripted(HEAD_THEN_DEATH)
    _, good_base = await upstreams.start()
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": {{urls: ["{dying_base}", "{good_base}"]}}\n'
    )
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200, body
    assert json.loads(body)["object"] == "chat.completion"
    assert header(response, "x-llmproxy-upstream-attempts") == "2"
    assert dying.requests == 1
    await timeout(access.wait(1), reactor)
    assert access[0]["status"] == 200 and access[0]["attempts"] == 2


@pytest.mark.parametrize(
    "answer, method, status",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"POST", 200),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"POST", 204),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"HEAD", 200),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_legitimately_empty_answer_is_passed_on(
    reactor, scripted, proxies, client, answer: bytes, method: bytes, status: int
) -> None:
    """An empty body that is the whole answer is no failure."""
    server, base = await scripted(answer)
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    response, body = await fetch(client, reactor, proxy + "/v1/x", CHAT if method == b"POST"
                                 else None, method=method)
    assert response.code == status
    assert body == b""
    assert server.requests == 1


# -- 4. dot segments ------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [b"/v1/..;/admin", b"/v1/%2e%2e;/admin", b"/v1/%25252e%25252e/admin",
     b"/v1/..;jsessionid=1/admin", b"/v1/%2e%2e%3b/admin"],
)
@pytest_twisted.ensureDeferred
async def test_dot_segments_in_disguise_are_refused(
    reactor, upstreams, proxies, target: bytes
) -> None:
    """``..;``, ``%2e%2e;`` and triple-encoded dots get 400; nothing goes upstream."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    peer = await connect(reactor, proxy)
    peer.transport.write(http(b"GET", target))
    await timeout(peer.wait_for(b"}}"), reactor)
    assert status_line(peer.received) == b"HTTP/1.1 400 Bad Request"
    assert json_error(peer.received)["code"] == "invalid_path"
    assert not upstream.requests
    peer.transport.loseConnection()


# -- 6. oversized heads, 7. reason phrases ------------------------------------------


@pytest.mark.parametrize(
    "request_bytes, expected, code",
    [
        (b"GET /v1/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
         b"HTTP/1.1 414 URI Too Long", "uri_too_long"),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
         b"HTTP/1.1 431 Request Header Fields Too Large", "headers_too_large"),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(20)) + b"\r\n",
         b"HTTP/1.1 431 Request Header Fields Too Large", "headers_too_large"),
    ],
    ids=["long-request-line", "long-header", "many-headers"],
)
@pytest_twisted.ensureDeferred
async def test_oversized_heads_are_answered_before_the_close(
    reactor, upstreams, proxies, request_bytes: bytes, expected: bytes, code: str
) -> None:
    """A head over the limits gets 414 or 431 with a JSON error, then a close."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    peer = await connect(reactor, proxy)
    peer.transport.write(request_bytes)
    await timeout(peer.closed, reactor)
    assert status_line(peer.received) == expected
    assert json_error(peer.received)["code"] == code
    assert not upstream.requests


@pytest_twisted.ensureDeferred
async def test_a_429_says_too_many_requests(reactor, upstreams, proxies) -> None:
    """Every status llmproxy produces has its standard reason phrase."""
    _, base = await upstreams.start()
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": "{base}"\nrate_limit: {{rate: 0.001, burst: 1}}\n'
    )
    peer = await connect(reactor, proxy)
    peer.transport.write(http(b"GET", b"/v1/models") * 2)
    await timeout(peer.wait_for(b"rate_limited"), reactor)
    assert b"HTTP/1.1 429 Too Many Requests\r\n" in peer.received
    peer.transport.loseConnection()
