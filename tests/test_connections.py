"""The daemon's HTTP front as a client sees it on raw loopback connections.

Each test starts a real proxy on 127.0.0.1 (``/v1/`` and ``/echo/`` routed to
a fake upstream) and parses its responses strictly: a status line,
well-formed headers, never both Content-Length and Transfer-Encoding, chunked
bodies read to the last chunk (tests/raw_http.py). Nothing here depends on
which HTTP server implementation answers: only on what HTTP/1.1 and the
daemon's documented behaviour promise a client.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from conftest import AccessRecords, timeout
from raw_http import Gateway, Gateways, Peer, Reply, assert_chat, chat, chat_body, http
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from llmproxy.testing.upstream import REPLY_TEXT, UpstreamRequest

_BIG = b"x" * (100 * 1024)  # a body larger than a socket read


def _events(reply: Reply) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [e.removeprefix(b"data: ") for e in reply.body.split(b"\n\n") if e]


def assert_stream(reply: Reply, model: str, pieces: int | None = None) -> None:
    """A complete SSE chat stream for ``model``, its pieces in order."""
    assert reply.status == 200, reply
    assert reply.header(b"content-type") == b"text/event-stream"
    events = _events(reply)
    assert events[-1] == b"[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["model"] for c in chunks} == {model}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == REPLY_TEXT
    if pieces is not None:  # a role event, the pieces, a finish event
        assert len(chunks) == pieces + 2


async def _in_flight(gw: Gateway) -> Peer:
    """A connection whose slow request stays in flight for the test."""
    arrived = gw.upstream.next_request()
    peer = await gw.connect()
    peer.transport.write(chat("busy", b"X-Fake-Header-Delay: 5"))
    await timeout(arrived, gw.gateways.reactor)
    return peer


@pytest_twisted.ensureDeferred
async def test_many_requests_on_one_keep_alive_connection(gateways: Gateways) -> None:
    """Thirty requests (chat POSTs and echoed PUTs) on one connection are each
    answered with their own body and X-Request-ID; the connection stays open."""
    gw = await gateways.start()
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
    assert not peer.closed.called and peer.unread() == b""
    assert len(gw.upstream.requests) == 30


_CHUNKED_BODY = b"5\r\nhello\r\n1\r\n \r\n6\r\nchunks\r\n0\r\n\r\n"


def _chunked(target: bytes, rid: bytes) -> bytes:
    """A POST to ``target`` with the chunked body ``hello chunks``."""
    return http(b"POST", target, b"", b"Transfer-Encoding: chunked",
                b"X-Request-ID: " + rid) + _CHUNKED_BODY


@pytest.mark.parametrize(
    "case", ["plain", "own-answer-in-the-middle", "large-body-queued", "stream-first",
             "chunked-bodies"])
@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(gateways: Gateways, case: str) -> None:
    """Three requests in one write get three complete responses in order,
    though the first is the slowest (a delayed answer or a slow stream): also
    when the second is the daemon's own ``/healthz``, when the third carries a
    100 KiB body, and when the bodies are chunked; each body reaches the
    upstream exactly."""
    gw = await gateways.start()
    peer = await gw.connect()
    if case == "stream-first":
        first = chat("slow", b"X-Request-ID: p1", b"X-Fake-Chunks: 5",
                     b"X-Fake-Chunk-Delay: 0.05", stream=True)
    else:
        first = chat("slow", b"X-Request-ID: p1", b"X-Fake-Header-Delay: 0.2")
    if case == "own-answer-in-the-middle":
        second = http(b"GET", b"/healthz", b"", b"X-Request-ID: p2")
    elif case == "chunked-bodies":
        second = _chunked(b"/echo/p2", b"p2")
    else:
        second = http(b"GET", b"/v1/models", b"", b"X-Request-ID: p2")
    third_body = _BIG if case == "large-body-queued" else b"third body"
    if case == "chunked-bodies":
        third, third_body = _chunked(b"/echo/p3", b"p3"), b"hello chunks"
    else:
        third = http(b"POST", b"/echo/p3", third_body, b"X-Request-ID: p3")
    peer.transport.write(first + second + third)
    replies = [await peer.reply() for _ in range(3)]
    if case == "stream-first":
        assert_stream(replies[0], "slow", 5)
        assert replies[0].header(b"x-request-id") == b"p1"
    else:
        assert_chat(replies[0], "slow", b"p1")
    assert replies[1].status == 200
    if case == "own-answer-in-the-middle":
        assert replies[1].json()["status"] == "ok"
    else:
        assert replies[1].header(b"x-request-id") == b"p2"
    if case == "chunked-bodies":
        assert replies[1].json()["body"] == "hello chunks"
    assert replies[2].status == 200 and replies[2].header(b"x-request-id") == b"p3"
    assert replies[2].json()["body"].encode() == third_body == gw.upstream.requests[-1].body
    assert not peer.closed.called and peer.unread() == b""


@pytest_twisted.ensureDeferred
async def test_request_one_byte_per_write(gateways: Gateways) -> None:
    """A request trickled one byte per write (a reactor turn apart) is
    answered once whole, the upstream gets its exact body, and the connection
    then serves the next request."""
    gw = await gateways.start()
    peer = await gw.connect()
    data = chat("trickled", b"X-Request-ID: t1")
    for i in range(len(data)):
        peer.transport.write(data[i:i + 1])
        await deferLater(gateways.reactor, 0, lambda: None)
    assert_chat(await peer.reply(), "trickled", b"t1")
    assert gw.upstream.requests[-1].body == chat_body("trickled")
    assert_chat(await peer.exchange(chat("next")), "next")
    assert len(gw.upstream.requests) == 2


_KINDS = {
    "healthz": (http(b"GET", b"/healthz"), None),
    "head": (http(b"HEAD", b"/echo/head"), None),
    "http-1.0": (http(b"POST", b"/echo/old", b"an old client", version=b"HTTP/1.0"),
                 b"an old client"),
    "chunked-body": (http(b"POST", b"/echo/chunked", b"", b"Transfer-Encoding: chunked")
                     + _CHUNKED_BODY, b"hello chunks"),
    "large-body": (http(b"POST", b"/echo/big", _BIG), _BIG),
    "expect-100-continue": (http(b"POST", b"/echo/expect", b"held back", b"Expect: 100-continue")
                            .removesuffix(b"held back"), b"held back"),
}


@pytest.mark.parametrize("case", list(_KINDS))
@pytest_twisted.ensureDeferred
async def test_requests_of_every_kind_on_one_connection(gateways: Gateways, case: str) -> None:
    """After a proxied POST, ``GET /healthz``, a HEAD, an HTTP/1.0 request, a
    chunked body, a large body, or one held back until ``100 Continue`` on
    the same connection gets the right answer and the upstream the exact
    body; then (but after HTTP/1.0, which closes) a further proxied POST is
    answered too."""
    gw = await gateways.start("max_body_bytes: 1048576\n")
    peer = await gw.connect()
    assert_chat(await peer.exchange(chat("before", b"X-Request-ID: h1")), "before", b"h1")
    request, body = _KINDS[case]
    reply = await peer.exchange(request, head_only=case == "head")
    if case == "expect-100-continue":
        assert reply.status == 100
        reply = await peer.exchange(body)
    assert reply.status == 200
    seen = gw.upstream.requests[-1]
    if case == "healthz":
        assert reply.json()["status"] == "ok" and len(gw.upstream.requests) == 1
    elif case == "head":
        assert seen.method == b"HEAD" and reply.body == b""
    else:
        assert seen.body == body == reply.json()["body"].encode()
    if case == "http-1.0":
        # No chunked coding for an HTTP/1.0 client; no keep-alive unless asked.
        assert reply.header(b"transfer-encoding") is None
        await peer.wait_closed()
        assert peer.unread() == b""
    else:
        assert_chat(await peer.exchange(chat("after", b"X-Request-ID: h3")), "after", b"h3")
        assert gw.upstream.requests[-1].body == chat_body("after")
        assert not peer.closed.called


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_connection_close_from_the_client(gateways: Gateways, stream: bool) -> None:
    """A request with ``Connection: close`` (while another client's request
    is in flight) gets a complete response saying ``Connection: close``, and
    then the server closes the connection, with nothing after the response."""
    gw = await gateways.start()
    await _in_flight(gw)
    peer = await gw.connect()
    reply = await peer.exchange(chat("bye", b"Connection: close", stream=stream))
    assert reply.header(b"connection") == b"close"
    if stream:
        assert_stream(reply, "bye")
    else:
        assert_chat(reply, "bye")
    await peer.wait_closed()
    assert peer.unread() == b""


@pytest_twisted.ensureDeferred
async def test_stream_without_length_is_chunked_then_connection_reused(
    gateways: Gateways,
) -> None:
    """An SSE stream (no Content-Length upstream) arrives chunked, whole and
    in order, and the same connection then serves another request."""
    gw = await gateways.start()
    peer = await gw.connect()
    reply = await peer.exchange(chat("streamed", b"X-Request-ID: s1", b"X-Fake-Chunks: 4",
                                     b"X-Fake-Chunk-Delay: 0.02", stream=True))
    assert reply.header(b"x-request-id") == b"s1"
    assert reply.header(b"transfer-encoding") == b"chunked"
    assert reply.header(b"content-length") is None
    assert_stream(reply, "streamed", 4)
    assert_chat(await peer.exchange(chat("reused", b"X-Request-ID: s2")), "reused", b"s2")
    assert not peer.closed.called


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
async def test_bad_syntax_is_answered_400(gateways: Gateways, case: str) -> None:
    """A malformed request gets a complete 400 response (as from twisted.web),
    reaches no upstream, and the daemon goes on serving other connections."""
    gw = await gateways.start()
    peer = await gw.connect()
    reply = await peer.exchange(_BAD[case])
    assert reply.status == 400, reply
    if case == "conflicting-content-length":
        # The request's framing is unknown: nothing more can be read from it.
        await peer.wait_closed()
        assert peer.unread() == b""
    assert list(gw.upstream.requests) == []
    assert_chat(await (await gw.connect()).exchange(chat("alive")), "alive")


@pytest_twisted.ensureDeferred
async def test_error_responses_are_valid_and_keep_the_connection(
    gateways: Gateways, proxies: Any
) -> None:
    """A 401 (no key), a 404 (no route), a 502 (upstream refuses) and an
    upstream's own 400 are complete HTTP/1.1 responses with a Content-Length,
    a Date and a JSON error naming the request; their request bodies are
    consumed, and the connection then serves a good request."""
    upstream, base = await gateways.upstreams.start()
    config = (f'target_map:\n  "/v1/": "{base}"\n  "/down/": "http://127.0.0.1:1"\n'
              "auth: {keys: [sk-client]}\n")
    gw = Gateway(await proxies.start(config), upstream, config, gateways)
    peer = await gw.connect()
    key = b"Authorization: Bearer sk-client"
    body = b'{"model": "m"}'
    unauthorized = await peer.exchange(chat("no-key", b"X-Request-ID: e1"))
    no_route = await peer.exchange(http(b"POST", b"/nowhere/x", body, key, b"X-Request-ID: e2"))
    refused = await peer.exchange(http(b"POST", b"/down/x", body, key, b"X-Request-ID: e3"))
    assert len(upstream.requests) == 0
    upstream_error = await peer.exchange(
        chat("bad", key, b"X-Request-ID: e4", b"X-Fake-Status: 400"))
    for reply, status, code, rid in ((unauthorized, 401, "invalid_api_key", "e1"),
                                     (no_route, 404, "route_not_found", "e2"),
                                     (refused, 502, "upstream_refused", "e3"),
                                     (upstream_error, 400, "http_400", None)):
        assert (reply.version, reply.status) == (b"HTTP/1.1", status), reply
        assert reply.header(b"content-length") == b"%d" % len(reply.body)
        assert reply.header(b"content-type") == b"application/json"
        assert reply.header(b"date") is not None
        error = reply.json()["error"]
        assert error["code"] == code
        if rid is not None:
            assert reply.header(b"x-request-id") == rid.encode()
            assert error["request_id"] == rid
    assert_chat(await peer.exchange(chat("with-key", key, b"X-Request-ID: e5")), "with-key", b"e5")
    assert len(upstream.requests) == 2
    assert not peer.closed.called


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_body_over_max_body_bytes_is_refused_with_413(
    gateways: Gateways, framing: str
) -> None:
    """A request body over max_body_bytes (declared, or found while reading
    a chunked body) gets a complete 413 JSON error, is never sent upstream,
    and the connection is then closed (its unread body cannot be skipped)."""
    gw = await gateways.start("max_body_bytes: 1024\n")
    peer = await gw.connect()
    body = json.dumps({"model": "m", "pad": "x" * 2000}).encode()
    if framing == "content-length":
        request = http(b"POST", b"/v1/chat/completions", body, b"X-Request-ID: big")
    else:
        request = http(b"POST", b"/v1/chat/completions", b"", b"Transfer-Encoding: chunked",
                       b"X-Request-ID: big") + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply = await peer.exchange(request)
    assert reply.status == 413
    assert reply.header(b"content-type") == b"application/json"
    assert reply.header(b"x-request-id") == b"big"
    assert reply.json()["error"]["code"] == "body_too_large"
    await peer.wait_closed()
    assert peer.unread() == b""
    assert list(gw.upstream.requests) == []
    assert_chat(await (await gw.connect()).exchange(chat("small")), "small")


@pytest_twisted.ensureDeferred
async def test_on_a_plain_listener_the_client_is_the_connections_peer(
    gateways: Gateways, access: AccessRecords
) -> None:
    """On a plain TCP listener the client is the connection's peer (here
    127.0.0.2), not what an untrusted X-Forwarded-For says: in the access
    record, and as the last hop of X-Forwarded-For upstream."""
    gw = await gateways.start()
    peer = await gw.connect(source="127.0.0.2")
    assert_chat(await peer.exchange(chat("peer", b"X-Forwarded-For: 198.51.100.7")), "peer")
    forwarded = gw.upstream.requests[-1].headers.getRawHeaders(b"x-forwarded-for")
    assert forwarded is not None and forwarded[-1].split(b",")[-1].strip() == b"127.0.0.2"
    await timeout(access.wait(1), gateways.reactor)
    assert access[0]["client_ip"] == "127.0.0.2"


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "header-then-request"])
@pytest_twisted.ensureDeferred
async def test_behind_a_proxy_protocol_listener_the_client_is_the_one_named(
    gateways: Gateways, access: AccessRecords, split: bool
) -> None:
    """Behind a load balancer (here 127.0.0.3) speaking the PROXY protocol to
    a ``haproxy:`` listener, the client is the one the PROXY header names,
    not the balancer: in X-Forwarded-For upstream and in the access record;
    also when the header and the request arrive in separate writes."""
    gw = await gateways.start(endpoint="haproxy:tcp:0:interface=127.0.0.1")
    peer = await gw.connect(source="127.0.0.3")
    header = b"PROXY TCP4 127.9.8.7 127.0.0.1 40000 80\r\n"
    if split:
        peer.transport.write(header)
        for _ in range(3):  # a few reactor turns: the header is read alone
            await deferLater(gateways.reactor, 0, lambda: None)
        reply = await peer.exchange(chat("behind"))
    else:
        reply = await peer.exchange(header + chat("behind"))
    assert_chat(reply, "behind")
    forwarded = gw.upstream.requests[-1].headers.getRawHeaders(b"x-forwarded-for")
    assert forwarded == [b"127.9.8.7"]
    await timeout(access.wait(1), gateways.reactor)
    assert access[0]["client_ip"] == "127.9.8.7"


@pytest_twisted.ensureDeferred
async def test_slow_reader_gets_a_large_body_whole(gateways: Gateways) -> None:
    """A client that stops reading a 64 MiB answer holds the upstream back
    (it stalls well before the end: the daemon does not buffer the body);
    when the client reads again, every byte arrives in place, then the close
    it asked for."""
    gw = await gateways.start()
    peer = await gw.connect()
    size = 64 * 1024 * 1024
    arrived = gw.upstream.next_request()
    peer.transport.pauseProducing()
    peer.transport.write(http(b"GET", b"/v1/big", b"", b"X-Fake-Body-Bytes: %d" % size,
                              b"X-Fake-Content-Length: 1", b"Connection: close"))
    seen = await timeout(arrived, gateways.reactor)
    await timeout(seen.paused, gateways.reactor)  # backpressure reached the upstream
    assert seen.bytes_sent < size and not seen.done.called
    assert len(peer.received) == 0
    peer.transport.resumeProducing()
    await peer.wait_closed(30)
    reply = await peer.reply()
    assert reply.status == 200 and reply.header(b"content-length") == b"%d" % size
    assert len(reply.body) == size
    assert reply.body == (bytes(range(256)) * (size // 256 + 1))[:size]
    assert await timeout(seen.done, gateways.reactor) == "finished"


@pytest_twisted.ensureDeferred
async def test_concurrent_clients_each_get_their_own_answers(gateways: Gateways) -> None:
    """Twenty connections sending five requests each, all at once (while
    another client's slow request is in flight), get each answer whole, on
    the right connection, in order."""
    gw = await gateways.start()
    await _in_flight(gw)
    peers = [await gw.connect() for _ in range(20)]

    async def five(n: int, peer: Peer) -> None:
        for i in range(5):
            rid = b"c%d-%d" % (n, i)
            assert_chat(await peer.exchange(chat(f"m{n}-{i}", b"X-Request-ID: " + rid)),
                        f"m{n}-{i}", rid)

    await timeout(gatherResults([Deferred.fromCoroutine(five(n, p))
                                 for n, p in enumerate(peers)], consumeErrors=True),
                  gateways.reactor, 30)
    assert all(not p.closed.called and p.unread() == b"" for p in peers)


@pytest_twisted.ensureDeferred
async def test_concurrent_streams_each_arrive_whole_and_in_order(gateways: Gateways) -> None:
    """Five SSE streams at once on five connections, their events
    interleaved in time, each arrive complete, in order, on their own
    connection."""
    gw = await gateways.start()
    peers = [await gw.connect() for _ in range(5)]

    async def stream(n: int, peer: Peer) -> None:
        reply = await peer.exchange(chat(f"s{n}", b"X-Fake-Chunks: 20",
                                         b"X-Fake-Chunk-Delay: 0.00%d" % (n + 1), stream=True))
        assert_stream(reply, f"s{n}", 20)

    await timeout(gatherResults([Deferred.fromCoroutine(stream(n, p))
                                 for n, p in enumerate(peers)], consumeErrors=True),
                  gateways.reactor, 30)


@pytest.mark.parametrize("when", ["waiting-for-the-head", "mid-stream"])
@pytest.mark.parametrize("leaving", ["close", "abort"])
@pytest_twisted.ensureDeferred
async def test_a_client_leaving_stops_the_upstream(
    gateways: Gateways, when: str, leaving: str
) -> None:
    """A client that closes (or resets) its connection while the upstream is
    slow to answer, or in the middle of a slow stream: the proxy closes the
    upstream's connection at once, so no more tokens are paid for, and
    serves the next client."""
    gw = await gateways.start()
    peer = await gw.connect()
    arrived = gw.upstream.next_request()
    slow = (b"X-Fake-Header-Delay: 30" if when == "waiting-for-the-head"
            else b"X-Fake-Chunk-Delay: 0.5")
    peer.transport.write(chat("leaving", b"X-Fake-Chunks: 100", slow, stream=True))
    upstream_request = await timeout(arrived, gateways.reactor)
    if when == "mid-stream":
        await timeout(peer.wait_for(b"data: "), gateways.reactor)
    assert not upstream_request.done.called
    if leaving == "close":
        peer.transport.loseConnection()
    else:
        peer.transport.abortConnection()
    # Long before the upstream would finish (30 s for the head, 50 s for
    # the stream): its connection was closed.
    outcome = await timeout(upstream_request.done, gateways.reactor, 5)
    assert outcome == "disconnected"
    assert_chat(await (await gw.connect()).exchange(chat("next")), "next")
