"""Resilience over loopback: upstream failures, retries, passive health,
aliases, fallbacks.

Besides scripted twisted.web upstreams, raw-socket upstreams misbehave the way
real ones do (closing a kept-alive connection after reading a request); the
tests check what the client and the upstream each saw: a request the upstream
may have received is never sent twice, except as a counted retry.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import ResponseFailed
from twisted.web.resource import Resource
from twisted.web.server import Site

from conftest import timeout
from helpers import collect, fetch, header, send
from llmproxy.web import build_admin_resource

WAIT = 10.0
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.5}


class Scripted(Resource):
    """An upstream answering from a script of (status, headers, body)."""

    isLeaf = True

    def __init__(self, script: list[tuple[int, dict[str, str], bytes]], repeat_last: bool = True):
        super().__init__()
        self.script = list(script)
        self.repeat_last = repeat_last
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> bytes:
        request.content.seek(0)
        self.bodies.append(request.content.read())
        status, headers, body = self.script[0] if len(self.script) == 1 else self.script.pop(0)
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        request.setHeader(b"content-type", b"application/json")
        return body


@pytest_twisted.async_yield_fixture
async def scripted(reactor: Any) -> Any:
    """A factory of scripted upstreams on loopback."""
    ports = []

    async def start(*script: tuple[int, dict[str, str], bytes]) -> tuple[Scripted, str]:
        resource = Scripted(list(script))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(resource)
        )
        ports.append(port)
        return resource, f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        await port.stopListening()


async def dead_url(reactor: Any) -> str:
    """A loopback URL where nothing listens (connection refused)."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}"


OK = (200, {}, b'{"ok": true}')
UNAVAILABLE = (503, {}, b'{"error": {"message": "overloaded"}}')


@pytest_twisted.ensureDeferred
async def test_dead_upstream_is_retried_then_ejected(reactor, upstreams, proxies, client, access):
    """One dead upstream of three: every request succeeds; after five failures
    the dead one gets no more traffic."""
    live = [await upstreams.start() for _ in range(2)]
    dead = await dead_url(reactor)
    urls = [live[0][1], dead, live[1][1]]
    proxy = await proxies.start(
        "target_map:\n  /v1/:\n    urls: [" + ", ".join(f'"{u}"' for u in urls) + "]\n"
    )
    for _ in range(200):
        response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
        assert response.code == 200
    retried = [r for r in access if r["attempts"] > 1]
    assert len(retried) == 5, "the dead upstream was tried until it was ejected"
    assert all(r["attempts"] == 2 for r in retried)
    assert sum(len(u.requests) for u, _ in live) == 200
    states = {u["url"]: u for pool in proxies.roots[-1].proxy.router.pools()
              for u in pool.state()}
    assert states[dead]["healthy"] is False


@pytest_twisted.ensureDeferred
async def test_status_503_is_retried_on_the_next_upstream(reactor, scripted, proxies, client):
    """A 503 before any byte reached the client goes to the next upstream."""
    bad, bad_url = await scripted(UNAVAILABLE)
    good, good_url = await scripted(OK)
    proxy = await proxies.start(f'target_map:\n  /v1/: {{urls: ["{bad_url}", "{good_url}"]}}\n')
    body = json.dumps(CHAT).encode()
    response, data = await fetch(client, reactor, proxy + "/v1/chat/completions", body)
    assert response.code == 200 and data == b'{"ok": true}'
    assert header(response, "x-llmproxy-upstream-attempts") == "2"
    assert bad.bodies == [body] and good.bodies == [body], "the body was replayed as is"


@pytest_twisted.ensureDeferred
async def test_all_failing_gives_the_last_failure_as_it_was(reactor, scripted, proxies, client):
    """When every upstream fails, the client gets the last answer unchanged."""
    first, first_url = await scripted((500, {}, b'{"error": "first"}'))
    last, last_url = await scripted((503, {"x-upstream": "last"}, b'{"error": "last"}'))
    proxy = await proxies.start(f'target_map:\n  /v1/: {{urls: ["{first_url}", "{last_url}"]}}\n')
    response, data = await fetch(client, reactor, proxy + "/v1/x", b"{}")
    assert (response.code, data) == (503, b'{"error": "last"}')
    assert header(response, "x-upstream") == "last"
    assert header(response, "x-llmproxy-upstream-attempts") == "2"


@pytest_twisted.ensureDeferred
async def test_mid_stream_abort_is_not_retried(reactor, upstreams, proxies, client):
    """Once a byte went to the client, a failure is the client's to see."""
    (one, one_url), (two, two_url) = [await upstreams.start() for _ in range(2)]
    proxy = await proxies.start(f'target_map:\n  /v1/: {{urls: ["{one_url}", "{two_url}"]}}\n')
    response = await send(
        client, reactor, proxy + "/v1/chat/completions", {**CHAT, "stream": True},
        headers={"X-Fake-Abort-After": "2"},
    )
    with pytest.raises(ResponseFailed):
        await collect(response).done.addTimeout(WAIT, reactor)
    assert len(one.requests) + len(two.requests) == 1


# -- a body ended by a close: whole, or cut short --------------------------

ONE_EVENT = b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
CLOSE_DELIMITED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"


@pytest.mark.parametrize("ending", ["reset", True], ids=["reset", "close"])
@pytest_twisted.ensureDeferred
async def test_a_close_delimited_stream_cut_short_is_cut_short_for_the_client(
    reactor, scripted_bytes, proxies, client, access, ending: bool | str
) -> None:
    """An event stream with neither a length nor chunking, ended by a reset
    or a close after one event, reaches the client without its final chunk
    (truncated, as a cut chunked stream does) and is recorded as an upstream
    failure, never as ``ok``."""
    _, base = await scripted_bytes(CLOSE_DELIMITED + ONE_EVENT, close=ending)
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    response = await send(client, reactor, proxy + "/v1/chat/completions",
                          {**CHAT, "stream": True})
    assert response.code == 200
    body = collect(response)
    with pytest.raises(ResponseFailed):
        await body.done.addTimeout(WAIT, reactor)
    assert b"".join(body.chunks) == ONE_EVENT
    await timeout(access.wait(1), reactor)
    assert access[0]["outcome"] == "upstream_aborted"
    assert access[0]["error_code"] == "upstream_aborted"


@pytest.mark.parametrize(
    "content_type, body",
    [
        (b"text/event-stream", ONE_EVENT + b"data: [DONE]\n\n"),
        (b"text/event-stream", b'event: message_stop\ndata: {"type": "message_stop"}\n\n'),
        (b"application/json", b'{"object": "chat.completion", "choices": []}\n'),
    ],
    ids=["openai-done", "anthropic-stop", "json"],
)
@pytest_twisted.ensureDeferred
async def test_a_close_delimited_body_that_ends_whole_is_whole(
    reactor, scripted_bytes, proxies, client, access, content_type: bytes, body: bytes
) -> None:
    """A body ended by a close whose last bytes end it (a stream's final
    event, a JSON document's closing brace) is passed on as complete."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n\r\n"
    _, base = await scripted_bytes(head + body, close=True)
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    response, received = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200
    assert received == body
    await timeout(access.wait(1), reactor)
    assert access[0]["outcome"] == "ok"


@pytest_twisted.ensureDeferred
async def test_a_close_delimited_stream_that_stalls_is_cut_off_as_truncated(
    reactor, scripted_bytes, proxies, client, access
) -> None:
    """An event stream of unknown length that goes silent is cut off at
    ``stream_idle`` and reaches the client truncated: Twisted reports the
    close that ends it like any other end of such a body, and it is not
    taken for a whole one."""
    _, base = await scripted_bytes(CLOSE_DELIMITED + ONE_EVENT, close=False)
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": "{base}"\ntimeouts: {{stream_idle: 0.2}}\n'
    )
    response = await send(client, reactor, proxy + "/v1/chat/completions",
                          {**CHAT, "stream": True})
    body = collect(response)
    with pytest.raises(ResponseFailed):
        await body.done.addTimeout(WAIT, reactor)
    await timeout(access.wait(1), reactor)
    assert access[0]["error_code"] == "stream_idle"


@pytest_twisted.ensureDeferred
async def test_alias_and_fallback_rewrite_only_the_model(
    reactor, scripted, upstreams, proxies, client, access
):
    """An alias routes to its model; when that model's upstreams all fail the
    fallback model answers; the body differs from the client's only in model."""
    failing, failing_url = await scripted(UNAVAILABLE)
    backup, backup_url = await upstreams.start()
    proxy = await proxies.start(
        f'target_map:\n  /v1/: "{backup_url}"\n'
        f'model_routes:\n  "gpt-4": "{failing_url}"\n  "gpt-4o": "{backup_url}"\n'
        'model_aliases: {"gpt4": "gpt-4"}\n'
        'fallbacks: {"gpt-4": ["gpt-4o"]}\n'
    )
    sent = {**CHAT, "model": "gpt4", "extra": {"nested": [1, 2.5, "é"]}}
    response, data = await fetch(
        client, reactor, proxy + "/v1/chat/completions", sent, headers={"X-Request-ID": "fb"}
    )
    assert response.code == 200
    assert header(response, "x-llmproxy-upstream-attempts") == "2"
    assert json.loads(failing.bodies[0]) == {**sent, "model": "gpt-4"}
    assert json.loads(backup.requests[-1].body) == {**sent, "model": "gpt-4o"}
    (record,) = [r for r in access if r["request_id"] == "fb"]
    assert record["model"] == "gpt-4o"
    assert record["upstream"] == backup_url
    assert record["attempts"] == 2
    registry = proxies.roots[-1].metrics.registry
    assert registry.get_sample_value("llmproxy_fallbacks_total", {"model": "gpt-4o"}) == 1


@pytest_twisted.ensureDeferred
async def test_readyz_lists_pools_and_their_health(reactor, upstreams, proxies, client):
    """/readyz shows each pool's upstreams and whether they are healthy."""
    live, live_url = await upstreams.start()
    dead = await dead_url(reactor)
    proxy = await proxies.start(
        f'target_map:\n  /v1/: {{urls: ["{dead}", "{live_url}"], eject_after: 1}}\n'
    )
    await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    response, data = await fetch(client, reactor, proxy + "/readyz", method=b"GET")
    assert data == b"ready\n", "the public port names no upstream"
    admin = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Site(build_admin_resource(proxies.roots[-1]))
    )
    try:
        url = f"http://127.0.0.1:{admin.getHost().port}/readyz"
        response, data = await fetch(client, reactor, url, method=b"GET")
    finally:
        await admin.stopListening()
    pools = {p["pool"]: p["upstreams"] for p in json.loads(data)["pools"]}
    health = {u["url"]: u["healthy"] for u in pools["/v1/"]}
    assert health == {dead: False, live_url: True}


# -- a head, then a close; an answer that is legitimately empty ---------------


HEAD_THEN_DEATH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_head_then_close_is_a_502_with_one_upstream(
    reactor, scripted_bytes, proxies, client, access
) -> None:
    """A head and no body is a failure before the first byte, recorded so."""
    _, base = await scripted_bytes(HEAD_THEN_DEATH)
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 502, body
    assert json.loads(body)["error"]["type"] == "upstream_error"
    assert header(response, "content-type") == "application/json"
    await timeout(access.wait(1), reactor)
    assert access[0]["status"] == 502


@pytest_twisted.ensureDeferred
async def test_head_then_close_is_retried_on_another_upstream(
    reactor, scripted_bytes, upstreams, proxies, client, access
) -> None:
    """With a second upstream the client gets its answer, on attempt 2."""
    dying, dying_base = await scripted_bytes(HEAD_THEN_DEATH)
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
    reactor, scripted_bytes, proxies, client, answer: bytes, method: bytes, status: int
) -> None:
    """An empty body that is the whole answer is no failure."""
    server, base = await scripted_bytes(answer)
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    response, body = await fetch(client, reactor, proxy + "/v1/x", CHAT if method == b"POST"
                                 else None, method=method)
    assert response.code == status
    assert body == b""
    assert server.requests == 1


# -- a request the upstream read, then a hang-up -----------------------------


@pytest_twisted.ensureDeferred
async def test_a_post_met_by_a_stale_pooled_connection_is_sent_once_more_on_a_new_one(
    reactor, raw_servers, proxies, client, access
) -> None:
    """An upstream that closes a kept-alive connection after reading a POST
    (a stale connection: closed before a single response byte) gets the POST
    once more on a new connection: counted (attempts 2), never more."""
    server, base = await raw_servers(answers_per_connection=1)
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": {{urls: ["{base}"], retries: 0}}\n'
    )
    response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200, body
    assert header(response, "x-llmproxy-upstream-attempts") == "2"
    assert server.requests == [b"POST /v1/chat/completions HTTP/1.1"] * 3
    assert server.connections == 2, "the resend went out on a new connection"
    await timeout(access.wait(2), reactor)
    assert [(r["status"], r["attempts"]) for r in access] == [(200, 1), (200, 2)]
    registry = proxies.gateways[-1].metrics.registry
    assert registry.get_sample_value(
        "llmproxy_upstream_stale_retries_total", {"upstream": base}
    ) == 1


@pytest_twisted.ensureDeferred
async def test_a_resend_after_a_stale_connection_happens_once(
    reactor, raw_servers, proxies, client, access
) -> None:
    """When the resend on a new connection fails too, the client gets a 502
    counting both attempts; nothing is sent a third time."""
    server, base = await raw_servers(answers_per_connection=1)
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": {{urls: ["{base}"], retries: 0}}\n'
    )
    response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200
    server.answers_per_connection = 0  # from now on: read, then hang up
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 502, body
    assert json.loads(body)["error"]["type"] == "upstream_error"
    assert header(response, "x-llmproxy-upstream-attempts") == "2"
    assert server.requests == [b"POST /v1/chat/completions HTTP/1.1"] * 3
    await timeout(access.wait(2), reactor)
    assert access[-1]["attempts"] == 2


@pytest_twisted.ensureDeferred
async def test_a_post_on_a_new_connection_that_is_dropped_is_not_resent(
    reactor, raw_servers, proxies, client, access
) -> None:
    """A new connection closed before answering is the upstream failing, not
    a stale connection: the POST is sent once (then retried only on another
    upstream, as the route allows)."""
    server, base = await raw_servers(answers_per_connection=0)
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": {{urls: ["{base}"], retries: 0}}\n'
    )
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 502, body
    assert header(response, "x-llmproxy-upstream-attempts") == "1"
    assert server.requests == [b"POST /v1/chat/completions HTTP/1.1"]


@pytest_twisted.ensureDeferred
async def test_an_upstream_closing_after_every_answer_loses_no_request(
    reactor, raw_servers, proxies, client, access
) -> None:
    """An upstream that closes its connection after every answer without
    saying ``Connection: close`` costs no request at 16 at once: each one
    that meets a connection closed under it is sent once more."""
    server, base = await raw_servers(answers_per_connection=1)
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": {{urls: ["{base}"], retries: 0}}\n'
    )

    async def one(n: int) -> int:
        response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
        return response.code

    for _ in range(10):
        codes = await gatherResults(
            [Deferred.fromCoroutine(one(i)) for i in range(16)]
        ).addTimeout(WAIT, reactor)
        assert codes == [200] * 16
    assert len(server.requests) <= 2 * 160


@pytest_twisted.ensureDeferred
async def test_post_dropped_by_one_upstream_is_a_counted_retry_on_the_next(
    reactor, raw_servers, proxies, client, access
) -> None:
    """With a second upstream, a POST that two connections to the first one
    failed (the stale pooled one, then a new one) is answered by the second:
    attempts say 3."""
    flaky, flaky_base = await raw_servers(answers_per_connection=1)
    steady, steady_base = await raw_servers(answers_per_connection=100)
    proxy = await proxies.start(
        f'target_map:\n  "/warm/": "{flaky_base}"\n'
        f'  "/v1/": {{urls: ["{flaky_base}", "{steady_base}"]}}\n'
    )
    # Leave a kept-alive connection to the flaky upstream in the pool.
    response, _ = await fetch(client, reactor, proxy + "/warm/chat/completions", CHAT)
    assert response.code == 200
    flaky.answers_per_connection = 0
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200, body
    assert header(response, "x-llmproxy-upstream-attempts") == "3"
    assert flaky.requests == [
        b"POST /warm/chat/completions HTTP/1.1", *[b"POST /v1/chat/completions HTTP/1.1"] * 2
    ]
    assert steady.requests == [b"POST /v1/chat/completions HTTP/1.1"]
    await timeout(access.wait(2), reactor)
    assert access[-1]["attempts"] == 3


# -- failing before anything is sent ---------------------------------------------


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
