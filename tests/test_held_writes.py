"""Answers written while other requests are in flight (llmproxy._io).

With more than one request in flight, the front end holds what it writes
until the end of the reactor iteration and then sends it all together.
These tests keep a slow request in flight on another connection, so that
every write below is held, and check what a client would notice: whole
answers, in order, never lost on a close or a hand-over to twisted.web.
"""

from __future__ import annotations

import json

import pytest_twisted
from raw_http import Fast, Gateway, Peer, assert_chat, chat, http
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from llmproxy.testing.upstream import REPLY_TEXT


async def _busy(gw: Gateway) -> Peer:
    """A connection whose request stays in flight for the rest of the test."""
    peer = await gw.connect()
    peer.transport.write(chat("busy", b"X-Fake-Header-Delay: 5"))
    for _ in range(500):  # until the upstream has it (at most 5 s)
        if any(b'"busy"' in r.body for r in gw.upstream.requests):
            return peer
        await deferLater(gw.fast.reactor, 0.01, lambda: None)
    raise AssertionError("the busy request never reached the upstream")


@pytest_twisted.ensureDeferred
async def test_pipelined_answers_stay_in_order_across_a_hand_over(fast: Fast) -> None:
    """Pipelined: a proxied POST, ``GET /healthz`` (served by twisted.web
    from then on) and another POST get their three answers in order."""
    gw = await fast.start()
    await _busy(gw)
    peer = await gw.connect()
    peer.transport.write(
        chat("first", b"X-Request-ID: h1", b"X-Fake-Header-Delay: 0.05")
        + http(b"GET", b"/healthz")
        + http(b"POST", b"/echo/third", b"third body", b"X-Request-ID: h3")
    )
    first, health, third = [await peer.reply() for _ in range(3)]
    assert_chat(first, "first", b"h1")
    assert health.status == 200 and health.json()["status"] == "ok"
    assert third.status == 200 and third.header(b"x-request-id") == b"h3"
    assert third.json()["body"] == "third body"
    assert len(fast.handovers) == 1


@pytest_twisted.ensureDeferred
async def test_concurrent_clients_each_get_their_own_answers(fast: Fast) -> None:
    """Twenty connections sending five requests each, all at once, get each
    answer whole and on the right connection, in order."""
    gw = await fast.start()
    await _busy(gw)
    peers = [await gw.connect() for _ in range(20)]

    async def five(n: int, peer: Peer) -> None:
        for i in range(5):
            rid = b"c%d-%d" % (n, i)
            assert_chat(await peer.exchange(chat(f"m{n}-{i}", b"X-Request-ID: " + rid)),
                        f"m{n}-{i}", rid)

    await gatherResults([Deferred.fromCoroutine(five(n, p)) for n, p in enumerate(peers)])
    assert fast.handovers == []


@pytest_twisted.ensureDeferred
async def test_stream_arrives_whole_and_in_order(fast: Fast) -> None:
    """An SSE stream's events arrive complete and in order."""
    gw = await fast.start()
    await _busy(gw)
    peer = await gw.connect()
    reply = await peer.exchange(chat("streamed", b"X-Fake-Chunks: 6",
                                     b"X-Fake-Chunk-Delay: 0.01", stream=True))
    assert reply.status == 200 and reply.header(b"transfer-encoding") == b"chunked"
    events = [e.removeprefix(b"data: ") for e in reply.body.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("content", "") for d in deltas) == REPLY_TEXT


@pytest_twisted.ensureDeferred
async def test_slow_reader_gets_a_large_body_whole(fast: Fast) -> None:
    """A client that stops reading a 64 MiB answer pauses the upstream (the
    kernel took only part of a send); when it reads again, every byte
    arrives in place, then the close it asked for."""
    gw = await fast.start()
    await _busy(gw)
    peer = await gw.connect()
    size = 64 * 1024 * 1024
    arrived = gw.upstream.next_request()
    peer.transport.pauseProducing()
    peer.transport.write(http(b"GET", b"/v1/big", b"", b"X-Fake-Body-Bytes: %d" % size,
                              b"X-Fake-Content-Length: 1", b"Connection: close"))
    seen = await arrived.addTimeout(10, fast.reactor)
    # Wait until the upstream stalls: no byte sent for a quarter second.
    last, still = -1, 0
    while still < 5 and seen.bytes_sent < size:
        still = still + 1 if seen.bytes_sent == last else 0
        last = seen.bytes_sent
        await deferLater(fast.reactor, 0.05, lambda: None)
    assert seen.bytes_sent < size and len(peer.received) == 0
    peer.transport.resumeProducing()
    await peer.wait_closed(30)
    reply = await peer.reply()
    assert reply.status == 200 and len(reply.body) == size
    assert reply.body == (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest_twisted.ensureDeferred
async def test_answer_before_close_is_not_lost(fast: Fast) -> None:
    """With ``Connection: close`` the whole answer arrives before the close."""
    gw = await fast.start()
    await _busy(gw)
    peer = await gw.connect()
    reply = await peer.exchange(chat("bye", b"Connection: close"))
    assert_chat(reply, "bye")
    await peer.wait_closed()
    assert peer.unread() == b""
