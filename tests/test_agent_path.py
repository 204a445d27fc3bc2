"""The request path on Twisted's Agent: never sent twice, nothing swallowed.

These run the whole proxy on loopback against raw-socket upstreams that
misbehave the way real ones do (closing a kept-alive connection after reading
a request), and check what the client and the upstream each saw.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from conftest import timeout
from helpers import fetch, header

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
ANSWER = json.dumps({"object": "chat.completion", "choices": []}).encode()


class _RawUpstream(Protocol):
    """Reads requests (Content-Length bodies) and answers or hangs up."""

    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.buffer = b""
        self.served = 0

    def connectionMade(self) -> None:
        self.server.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.server.requests.append(head.split(b"\r\n", 1)[0])
            if self.served >= self.server.answers_per_connection:
                self.transport.loseConnection()  # read it, never answer
                return
            self.served += 1
            if head.startswith(b"HEAD "):
                # The length of what a GET would get, and no body.
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
                continue
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
            )

    def connectionLost(self, reason: Failure = None) -> None:
        self.server.closed += 1


class RawServer(Factory):
    """An upstream answering ``answers_per_connection`` requests a connection.

    Attributes:
        requests: The request line of every request it read.
        connections: Connections accepted.
        closed: Connections closed.
    """

    def __init__(self, answers_per_connection: int) -> None:
        self.answers_per_connection = answers_per_connection
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed = 0

    def buildProtocol(self, addr: Any) -> _RawUpstream:
        return _RawUpstream(self)


@pytest.fixture
def raw_servers(loopback: Any) -> Any:
    """A factory of raw upstreams on loopback, stopped after the test."""

    async def start(answers_per_connection: int) -> tuple[RawServer, str]:
        server = RawServer(answers_per_connection)
        return server, await loopback(server)

    return start


@pytest_twisted.ensureDeferred
async def test_post_read_then_dropped_on_a_reused_connection_is_sent_once(
    reactor, raw_servers, proxies, client, access
) -> None:
    """A POST the upstream read before hanging up is a 502, never a resend."""
    server, base = await raw_servers(answers_per_connection=1)
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": {{urls: ["{base}"], retries: 0}}\n'
    )
    response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 502, body
    assert json.loads(body)["error"]["type"] == "upstream_error"
    assert header(response, "x-llmproxy-upstream-attempts") == "1"
    assert server.requests == [b"POST /v1/chat/completions HTTP/1.1"] * 2
    assert server.connections == 1, "the second POST went out on the kept-alive connection"
    await timeout(access.wait(2), reactor)
    assert [r["status"] for r in access] == [200, 502]


@pytest_twisted.ensureDeferred
async def test_post_dropped_by_one_upstream_is_a_counted_retry_on_the_next(
    reactor, raw_servers, proxies, client, access
) -> None:
    """With a second upstream, the retry is visible: attempts say 2."""
    flaky, flaky_base = await raw_servers(answers_per_connection=1)
    steady, steady_base = await raw_servers(answers_per_connection=100)
    proxy = await proxies.start(
        f'target_map:\n  "/warm/": "{flaky_base}"\n'
        f'  "/v1/": {{urls: ["{flaky_base}", "{steady_base}"]}}\n'
    )
    # Leave a kept-alive connection to the flaky upstream in the pool.
    response, _ = await fetch(client, reactor, proxy + "/warm/chat/completions", CHAT)
    assert response.code == 200
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200, body
    assert header(response, "x-llmproxy-upstream-attempts") == "2"
    assert flaky.requests == [
        b"POST /warm/chat/completions HTTP/1.1", b"POST /v1/chat/completions HTTP/1.1"
    ]
    assert steady.requests == [b"POST /v1/chat/completions HTTP/1.1"]
    await timeout(access.wait(2), reactor)
    assert access[-1]["attempts"] == 2


@pytest_twisted.ensureDeferred
async def test_head_keeps_the_upstreams_content_length(
    reactor, raw_servers, proxies, client
) -> None:
    """A HEAD answer carries the length the upstream gave, and no body."""
    server, base = await raw_servers(answers_per_connection=100)
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    for _ in range(2):  # the kept-alive connection stays usable after a HEAD
        head, nothing = await fetch(client, reactor, proxy + "/v1/files/f1", method=b"HEAD")
        assert head.code == 200
        assert nothing == b""
        assert header(head, "content-length") == "1234"
    assert server.requests == [b"HEAD /v1/files/f1 HTTP/1.1"] * 2
    assert server.connections == 1


@pytest_twisted.ensureDeferred
async def test_an_error_while_sending_after_the_decision_is_a_prompt_502(
    reactor, proxies, client, access
) -> None:
    """A destination whose TLS name cannot be encoded fails at once as a 502.

    The upstream name resolves (through the test resolver) into
    direct_networks, so the request is decided direct, then the TLS endpoint
    for a name with ``_`` (which IDNA refuses) cannot be made.
    """
    proxies.resolver.hosts["bad_name.internal.test"] = ["127.0.0.1"]
    proxy = await proxies.start(
        'target_map:\n  "/v1/": "https://bad_name.internal.test:9"\n'
        'proxy_url: "http://127.0.0.1:9"\ndirect_networks: ["127.0.0.0/8"]\n'
        "timeouts: {response_header: 60}\n"
    )
    started = reactor.seconds()
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 502, body
    assert reactor.seconds() - started < 5
    assert json.loads(body)["error"]["code"] == "upstream_failed"
    await timeout(access.wait(1), reactor)
    assert access[0]["egress"] is None and access[0]["status"] == 502


class _BrokenRouter:
    """A router with a bug: every lookup raises."""

    def route(self, path: bytes, model: str | None) -> Any:
        raise RuntimeError("a bug in routing")

    def pools(self) -> list[Any]:
        return []


@pytest.mark.allow_logged_failures
@pytest_twisted.ensureDeferred
async def test_a_bug_in_the_proxy_is_a_json_500_and_the_daemon_goes_on(
    reactor, upstreams, proxies, client, fail_on_logged_failures
) -> None:
    """An exception inside the proxy resource answers an OpenAI-shaped 500."""
    _, base = await upstreams.start()
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    root = proxies.roots[-1]
    router, root.proxy.router = root.proxy.router, _BrokenRouter()
    response, body = await fetch(
        client, reactor, proxy + "/v1/chat/completions", CHAT,
        headers={"X-Request-ID": "bug-1"},
    )
    assert response.code == 500
    assert header(response, "content-type") == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "server_error"
    assert "Traceback" not in body.decode() and "a bug in routing" not in error["message"]
    assert header(response, "x-request-id") == "bug-1"
    assert [e["request_id"] for e in fail_on_logged_failures] == ["bug-1"]
    root.proxy.router = router
    response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200
