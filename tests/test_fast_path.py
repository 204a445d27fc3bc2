"""The fast path (llmproxy._server) as a client sees it on a raw socket.

Each test starts a real proxy on 127.0.0.1 (``/v1/`` and ``/echo/`` routed to
a fake upstream) and parses its responses strictly: a status line, well-formed
headers, never both Content-Length and Transfer-Encoding, chunked bodies read
to the last chunk (tests/raw_http.py). The harness records each connection handed over to
twisted.web's HTTPChannel, so a test knows which path it exercised.
"""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
import pytest_twisted
from helpers import WAIT, raw_connect
from raw_http import Fast, assert_chat, chat, chat_body, http
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from llmproxy._server import FastHeaders, FastRequest
from llmproxy.proxy import ProxyResource
from llmproxy.testing.upstream import REPLY_TEXT

_BIG = b"x" * (100 * 1024)  # over the fast path's 64 KiB body limit


@pytest_twisted.ensureDeferred
async def test_many_requests_on_one_keep_alive_connection(fast: Fast) -> None:
    """Thirty requests (chat POSTs and echoed PUTs) on one connection are each
    answered with their own body and X-Request-ID; the connection stays open."""
    gw = await fast.start()
    peer = await gw.connect()
    for i in range(30):
        rid = b"keep-%d" % i
        if i % 2 == 0:
            assert_chat(await peer.exchange(chat(f"m{i}", b"X-Request-ID: " + rid)), f"m{i}", rid)
            continue
        body, target = b"payload %d" % i, b"/echo/%d?q=%d" % (i, i)
        reply = await peer.exchange(http(b"PUT", target, body, b"X-Request-ID: " + rid))
        echo = reply.json()
        assert (echo["method"], echo["uri"], echo["body"]) == ("PUT", target.decode(), body.decode())
        assert dict(echo["headers"])["x-request-id"] == rid.decode()
        assert reply.header(b"x-request-id") == rid
    assert not peer.closed.called
    assert len(gw.upstream.requests) == 30
    assert fast.handovers == []


@pytest.mark.parametrize("case", ["all-fast", "hand-over-in-the-middle", "over-64-KiB-queued"])
@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(fast: Fast, case: str) -> None:
    """Three requests in one write get three responses in order, though the
    first is the slowest; also when the second is ``/healthz`` (twisted.web
    serves the rest) or the third carries a 100 KiB body queued behind the
    first."""
    gw = await fast.start()
    peer = await gw.connect()
    second = b"/healthz" if case == "hand-over-in-the-middle" else b"/v1/models"
    third = _BIG if case == "over-64-KiB-queued" else b"third body"
    peer.transport.write(
        chat("slow", b"X-Request-ID: p1", b"X-Fake-Header-Delay: 0.2")
        + http(b"GET", second, b"", b"X-Request-ID: p2")
        + http(b"POST", b"/echo/p3", third, b"X-Request-ID: p3")
    )
    first, middle, last = [await peer.reply() for _ in range(3)]
    assert_chat(first, "slow", b"p1")
    assert middle.status == 200
    if case == "hand-over-in-the-middle":
        assert middle.json()["status"] == "ok"
    else:
        assert middle.header(b"x-request-id") == b"p2"
    assert last.status == 200 and last.header(b"x-request-id") == b"p3"
    assert last.json()["body"].encode() == third == gw.upstream.requests[-1].body
    assert len(fast.handovers) == (0 if case == "all-fast" else 1)


@pytest_twisted.ensureDeferred
async def test_request_one_byte_per_write(fast: Fast) -> None:
    """A request trickled one byte per write (a reactor turn apart) is parsed
    once whole and answered; the connection then serves the next request."""
    gw = await fast.start()
    peer = await gw.connect()
    data = chat("trickled", b"X-Request-ID: t1")
    for i in range(len(data)):
        peer.transport.write(data[i:i + 1])
        await deferLater(fast.reactor, 0, lambda: None)
    assert_chat(await peer.reply(), "trickled", b"t1")
    assert gw.upstream.requests[-1].body == chat_body("trickled")
    assert_chat(await peer.exchange(chat("next")), "next")
    assert len(gw.upstream.requests) == 2
    assert fast.handovers == []


_HANDED_OVER = {
    "healthz": (http(b"GET", b"/healthz"), None),
    "head": (http(b"HEAD", b"/echo/head"), None),
    "http-1.0": (http(b"POST", b"/echo/old", b"an old client", version=b"HTTP/1.0"),
                 b"an old client"),
    "chunked-body": (http(b"POST", b"/echo/chunked", b"", b"Transfer-Encoding: chunked")
                     + b"5\r\nhello\r\n1\r\n \r\n6\r\nchunks\r\n0\r\n\r\n", b"hello chunks"),
    "body-over-64-KiB": (http(b"POST", b"/echo/big", _BIG), _BIG),
    "expect-100-continue": (http(b"POST", b"/echo/expect", b"held back", b"Expect: 100-continue")
                            .removesuffix(b"held back"), b"held back"),
}


@pytest.mark.parametrize("case", list(_HANDED_OVER))
@pytest_twisted.ensureDeferred
async def test_hand_over_in_the_middle_of_a_connection(fast: Fast, case: str) -> None:
    """After a proxied POST, ``GET /healthz``, a HEAD, an HTTP/1.0 request, a
    chunked body, a body over 64 KiB (under max_body_bytes) or one held back
    until ``100 Continue`` on the same connection gets the right answer, the
    upstream the exact body, and (but after HTTP/1.0, which closes) a further
    proxied POST is answered too."""
    gw = await fast.start("max_body_bytes: 1048576\n")
    peer = await gw.connect()
    assert_chat(await peer.exchange(chat("before", b"X-Request-ID: h1")), "before", b"h1")
    assert fast.handovers == []
    request, body = _HANDED_OVER[case]
    reply = await peer.exchange(request, head_only=case == "head")
    if case == "expect-100-continue":
        assert reply.status == 100
        reply = await peer.exchange(body)
    assert reply.status == 200 and len(fast.handovers) == 1
    seen = gw.upstream.requests[-1]
    if case == "healthz":
        assert reply.json()["status"] == "ok" and len(gw.upstream.requests) == 1
    elif case == "head":
        assert seen.method == b"HEAD" and reply.body == b""
    else:
        assert seen.body == body == reply.json()["body"].encode()
    if case == "http-1.0":
        assert reply.version == b"HTTP/1.0"
        await peer.wait_closed()
        assert peer.unread() == b""
    else:
        assert_chat(await peer.exchange(chat("after", b"X-Request-ID: h3")), "after", b"h3")
        assert gw.upstream.requests[-1].body == chat_body("after")
        assert not peer.closed.called


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_connection_close_from_the_client(fast: Fast, stream: bool) -> None:
    """A request with ``Connection: close`` gets a complete response saying
    ``Connection: close``, and then the server closes the connection."""
    gw = await fast.start()
    peer = await gw.connect()
    reply = await peer.exchange(chat("bye", b"Connection: close", stream=stream))
    assert reply.status == 200 and reply.header(b"connection") == b"close"
    assert reply.body.endswith(b"data: [DONE]\n\n") if stream else reply.json()["model"] == "bye"
    await peer.wait_closed()
    assert peer.unread() == b""
    assert fast.handovers == []


@pytest_twisted.ensureDeferred
async def test_stream_without_length_is_chunked_then_connection_reused(fast: Fast) -> None:
    """An SSE stream (no Content-Length upstream) arrives chunked, whole and
    in order, and the same connection then serves another request."""
    gw = await fast.start()
    peer = await gw.connect()
    reply = await peer.exchange(chat("streamed", b"X-Request-ID: s1", b"X-Fake-Chunks: 4",
                                     b"X-Fake-Chunk-Delay: 0.02", stream=True))
    assert reply.status == 200 and reply.header(b"x-request-id") == b"s1"
    assert reply.header(b"transfer-encoding") == b"chunked"
    assert reply.header(b"content-type") == b"text/event-stream"
    events = [e.removeprefix(b"data: ") for e in reply.body.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and len(events) == 4 + 3
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("content", "") for d in deltas) == REPLY_TEXT
    assert_chat(await peer.exchange(chat("reused", b"X-Request-ID: s2")), "reused", b"s2")
    assert fast.handovers == []


_BAD = {
    "header-without-colon": http(b"GET", b"/v1/models", b"", b"X-No-Colon"),
    "space-before-colon": http(b"GET", b"/v1/models", b"", b"X-Name : value"),
    "conflicting-content-length": http(b"POST", b"/v1/chat/completions", b"", b"Content-Length: 2",
                                       b"Content-Length: 3") + b"{} ",
    "absolute-form-target": http(b"POST", b"http://x/v1/chat/completions", b"{}"),
    "two-spaces-in-request-line": http(b"POST", b" /v1/chat/completions", b"{}"),
}


@pytest.mark.parametrize("case", list(_BAD))
@pytest_twisted.ensureDeferred
async def test_bad_syntax_is_refused_like_twisted_web(fast: Fast, case: str) -> None:
    """Malformed requests get the same 4xx as from plain twisted.web, reach no
    upstream, and the daemon goes on serving other connections."""
    gw = await fast.start()
    reference = await fast.proxies.start(gw.config)
    fast.proxies.roots[-1].fast_path = False  # that site serves with HTTPChannel only
    statuses = [(await (await gw.connect(url)).exchange(_BAD[case])).status
                for url in (gw.url, reference)]
    assert statuses[0] == statuses[1] and 400 <= statuses[0] < 500, statuses
    assert len(fast.handovers) == 1
    assert list(gw.upstream.requests) == []
    assert_chat(await (await gw.connect()).exchange(chat("alive")), "alive")



@pytest.mark.parametrize("delay", [0, 0.8],
                         ids=["quick-response", "response-slower-than-client-idle"])
@pytest_twisted.ensureDeferred
async def test_idle_keep_alive_connection_is_closed_after_client_idle(
    fast: Fast, delay: float
) -> None:
    """A response, even one slower than client_idle, is not cut short; once it
    is served, the idle keep-alive connection is closed after client_idle (not
    at once, not never)."""
    gw = await fast.start("timeouts: {client_idle: 0.4}\n")
    peer = await gw.connect()
    reply = await peer.exchange(chat("idle", b"X-Fake-Header-Delay: %g" % delay))
    assert_chat(reply, "idle")
    assert reply.header(b"connection") is None
    answered = fast.reactor.seconds()
    await peer.wait_closed(2.0)
    assert fast.reactor.seconds() - answered >= 0.2
    assert peer.unread() == b""
    assert fast.handovers == []


@pytest_twisted.ensureDeferred
async def test_error_responses_are_valid_and_keep_the_connection(fast: Fast) -> None:
    """A 401 (no key) and a 404 (no route) made on the fast path are valid
    HTTP/1.1 with Content-Length and a JSON error, their request bodies are
    consumed, and the connection then serves a good request."""
    gw = await fast.start("auth: {keys: [sk-client]}\n")
    peer = await gw.connect()
    key = b"Authorization: Bearer sk-client"
    unauthorized = await peer.exchange(chat("no-key", b"X-Request-ID: e1"))
    no_route = await peer.exchange(
        http(b"POST", b"/nowhere/x", b'{"model": "m"}', key, b"X-Request-ID: e2"))
    for reply, status, code, rid in ((unauthorized, 401, "invalid_api_key", "e1"),
                                     (no_route, 404, "route_not_found", "e2")):
        assert (reply.version, reply.status) == (b"HTTP/1.1", status)
        assert reply.header(b"content-length") == b"%d" % len(reply.body)
        assert reply.header(b"content-type") == b"application/json"
        assert reply.header(b"date") is not None
        assert reply.header(b"x-request-id") == rid.encode()
        error = reply.json()["error"]
        assert (error["code"], error["request_id"]) == (code, rid)
    assert_chat(await peer.exchange(chat("with-key", key, b"X-Request-ID: e3")), "with-key", b"e3")
    assert len(gw.upstream.requests) == 1
    assert fast.handovers == []
    assert not peer.closed.called


@pytest_twisted.ensureDeferred
async def test_proxied_requests_leave_no_reference_cycles(fast: Fast) -> None:
    """Plain and streamed proxied requests are freed as soon as they end:
    none leaves a reference cycle of llmproxy objects behind, so Python's
    cyclic garbage collector never has to run for them (it cost about 25 µs
    per request when each left one)."""
    gw = await fast.start()
    peer = await gw.connect()
    assert_chat(await peer.exchange(chat("warm-up")), "warm-up")
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(5):
            assert_chat(await peer.exchange(chat(f"m{i}")), f"m{i}")
            assert (await peer.exchange(chat(f"s{i}", stream=True))).status == 200
        gc.collect()
        # Only per-request objects: a proxy of an earlier test may still be
        # being torn down meanwhile.
        per_request = {"FastRequest", "FastHeaders", "_Exchange", "_StreamToClient",
                       "UsageReader", "UpstreamResponse", "_Attempt"}
        ours = [o for o in gc.garbage if type(o).__name__ in per_request]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []



@pytest.mark.parametrize("when", ["waiting-for-the-head", "mid-stream"])
@pytest.mark.parametrize("leaving", ["close", "abort"])
@pytest_twisted.ensureDeferred
async def test_a_client_leaving_stops_the_upstream(fast: Fast, when: str, leaving: str) -> None:
    """A client that closes (or resets) its connection while the upstream is
    slow to answer, or in the middle of a slow stream: the proxy closes the
    upstream's connection at once, so no more tokens are paid for, and
    serves the next client."""
    gw = await fast.start()
    peer = await gw.connect()
    arrived = gw.upstream.next_request()
    slow = (b"X-Fake-Header-Delay: 30" if when == "waiting-for-the-head"
            else b"X-Fake-Chunk-Delay: 0.5")
    peer.transport.write(chat("leaving", b"X-Fake-Chunks: 100", slow, stream=True))
    upstream_request = await arrived.addTimeout(WAIT, fast.reactor)
    if when == "mid-stream":
        await peer.wait_for(b"data: ")
    assert not upstream_request.done.called
    if leaving == "close":
        peer.transport.loseConnection()
    else:
        peer.transport.abortConnection()
    # Long before the upstream would finish (30 s for the head, 50 s for
    # the stream): its connection was closed.
    outcome = await upstream_request.done.addTimeout(5, fast.reactor)
    assert outcome == "disconnected"
    assert_chat(await (await gw.connect()).exchange(chat("next")), "next")


@pytest_twisted.ensureDeferred
async def test_the_client_address_is_the_connections_peer(reactor, upstreams, proxies,
                                                          access, monkeypatch) -> None:
    """On a plain TCP listener a fast-path request's client is its
    connection's peer, port included (what the timeout log line names, and
    what X-Forwarded-For and the access record take the host from)."""
    upstream, base = await upstreams.start()
    url = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    seen: list[Any] = []
    render = ProxyResource.render

    def spy(resource: Any, request: Any) -> Any:
        seen.append((request.getClientAddress(), request.channel.transport.getPeer()))
        return render(resource, request)

    monkeypatch.setattr(ProxyResource, "render", spy)
    client = await raw_connect(reactor, url, chat("peer"))
    await client.wait_for(b"chatcmpl").addTimeout(WAIT, reactor)
    port = client.transport.getHost().port
    ((address, peer),) = seen
    assert address == peer == IPv4Address("TCP", "127.0.0.1", port)
    await access.wait(1).addTimeout(WAIT, reactor)
    assert access[0]["client_ip"] == "127.0.0.1"
    client.transport.loseConnection()


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "header-then-request"])
@pytest_twisted.ensureDeferred
async def test_behind_a_proxy_protocol_listener_the_client_is_the_one_named(
    reactor, upstreams, proxies, access, split: bool
) -> None:
    """Behind a load balancer speaking the PROXY protocol (a ``haproxy:``
    listener), a fast-path request's client is the one the PROXY header
    names, not the balancer: in X-Forwarded-For upstream and in the access
    record."""
    upstream, base = await upstreams.start()
    url = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n',
                              endpoint="haproxy:tcp:0:interface=127.0.0.1")
    header = b"PROXY TCP4 127.9.8.7 127.0.0.1 40000 80\r\n"
    client = await raw_connect(reactor, url, header if split else header + chat("behind"))
    if split:
        await deferLater(reactor, 0.05, lambda: None)
        client.transport.write(chat("behind"))
    await client.wait_for(b"chatcmpl").addTimeout(WAIT, reactor)
    forwarded = upstream.requests[-1].headers.getRawHeaders(b"x-forwarded-for")
    assert forwarded == [b"127.9.8.7"]
    await access.wait(1).addTimeout(WAIT, reactor)
    assert access[0]["client_ip"] == "127.9.8.7"
    client.transport.loseConnection()


@pytest.mark.allow_logged_failures
def test_a_client_gone_callback_that_raises_is_logged_and_the_next_still_runs() -> None:
    """As with a Deferred's errbacks: one hook raising does not stop the
    others, and the error is logged, not raised into the connection's
    close."""
    request = FastRequest(None, b"POST", b"/v1/x", FastHeaders(), b"", True)
    called: list[Any] = []
    events: list[dict] = []
    request.when_gone(lambda reason: 1 / 0)
    request.when_gone(called.append)
    globalLogPublisher.addObserver(events.append)
    try:
        reason = Failure(ConnectionLost())
        request.connection_lost(reason)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert called == [reason]
    assert any("client that left" in str(e.get("log_format")) and
               e["log_failure"].check(ZeroDivisionError) for e in events)
    request.connection_lost(reason)  # a second loss calls nothing again
    assert called == [reason]
