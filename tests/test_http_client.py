"""The upstream HTTP/1.1 client (``ConnectionPool``) over real loopback sockets.

A tiny scripted TCP server records the bytes of every request it gets and
answers each with canned raw bytes, so every test controls the exact wire
format the client has to parse. Nothing listens or connects beyond 127.0.0.1.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss

from llmproxy.egress._http import MAX_HEAD, UpstreamProtocolError, UpstreamResponse, _Connection
from llmproxy.egress._pool import SPARE_WINDOW, ConnectionPool

WAIT = 10.0
KEY = ("direct", "http", "127.0.0.1", 1)
POST = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"
HEAD = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
FIRST = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n"
    b'6 ; quoted="a;b"\r\n world\r\n'
    b"0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"
)


def then_close(data: bytes) -> Callable[[Peer], None]:
    """Answer ``data``, then close (without saying ``Connection: close``)."""

    def answer(peer: Peer) -> None:
        peer.transport.write(data)
        peer.transport.loseConnection()

    return answer


#: Close the connection without answering.
hang_up = then_close(b"")
#: Answer nothing: leave the request hanging.
silent = None


def trickle(data: bytes) -> Callable[[Peer], None]:
    """Answer ``data`` one byte per write, one reactor turn apart."""

    def answer(peer: Peer, rest: bytes = data) -> None:
        if rest and not peer.closed:
            peer.transport.write(rest[:1])
            peer.up.reactor.callLater(0, answer, peer, rest[1:])

    return answer


class Peer(Protocol):
    """The server side of one connection: records requests, answers them."""

    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.requests: list[bytes] = []
        self.buf = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.up.peers.append(self)
        self.up.changed()

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            size = end + 4
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    size += int(value)
            if len(self.buf) < size:
                return
            request, self.buf = self.buf[:size], self.buf[size:]
            self.requests.append(request)
            self.up.requests.append(request)
            answer = self.up.answers.pop(0) if self.up.answers else silent
            if isinstance(answer, bytes):
                self.transport.write(answer)
            elif answer is not None:
                answer(self)
            self.up.changed()

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed = True
        self.up.changed()


class Body(Protocol):
    """Collects a response body; ``done`` fires with ``(bytes, reason)``."""

    def __init__(self, on_data: Callable[[Body], None] | None = None,
                 paused: bool = False) -> None:
        self.pieces: list[bytes] = []
        self.done: Deferred[tuple[bytes, Failure]] = Deferred()
        self.first: Deferred[None] = Deferred()
        self.on_data = on_data
        self.paused = paused

    def connectionMade(self) -> None:
        if self.paused:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)
        if self.on_data is not None:
            self.on_data(self)
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:
        self.done.callback((b"".join(self.pieces), reason))


def pause_at_first(body: Body) -> None:
    """A consumer that pauses its producer as its first piece arrives."""
    if len(body.pieces) == 1:
        body.transport.pauseProducing()


class Upstream(Factory):
    """A scripted raw server on 127.0.0.1 and the pools talking to it.

    The n-th request (on any connection) gets the n-th scripted answer:
    bytes, a function of the :class:`Peer`, or None for no answer.

    Attributes:
        peers: Server sides of the connections accepted, in order.
        requests: Every request's bytes, in arrival order.
        endpoint: A client endpoint reaching the server.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.answers: list[Any] = []
        self.peers: list[Peer] = []
        self.requests: list[bytes] = []
        self.pools: list[ConnectionPool] = []
        self._waits: list[tuple[Callable[[], bool], Deferred[None]]] = []
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.endpoint = TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port.getHost().port, timeout=WAIT
        )

    def buildProtocol(self, addr: Any) -> Peer:
        return Peer(self)

    def script(self, *answers: Any) -> None:
        """Answer the next requests with ``answers``, in order."""
        self.answers = list(answers)

    def pool(self, max_idle: int = 4, idle_timeout: float = 60.0, timer: Any = None,
             spare_window: float = 0.0) -> ConnectionPool:
        """A pool whose idle timers run on ``timer`` (the reactor by default).

        Spare connections are off unless ``spare_window`` is given: most
        tests here count the connections their requests open.
        """
        pool = ConnectionPool(timer or self.reactor, max_idle, idle_timeout, spare_window)
        self.pools.append(pool)
        return pool

    def until(self, check: Callable[[], bool]) -> Deferred[None]:
        """Fire once ``check()`` holds (checked whenever the server sees news)."""
        d: Deferred[None] = Deferred()
        self._waits.append((check, d))
        self.changed()
        return self.wait(d)

    def lost(self, index: int = 0) -> Deferred[None]:
        """Fire once the ``index``-th connection is closed."""
        return self.until(lambda: self.peers[index].closed)

    def changed(self) -> None:
        waits, self._waits = self._waits, []
        for check, d in waits:
            if not d.called and check():
                d.callback(None)
            elif not d.called:
                self._waits.append((check, d))

    def wait(self, d: Deferred[Any]) -> Deferred[Any]:
        return d.addTimeout(WAIT, self.reactor)

    def settle(self) -> Deferred[None]:
        """One reactor turn: bytes already read have been fully handled."""
        return deferLater(self.reactor, 0, lambda: None)

    async def send(self, pool: ConnectionPool, data: bytes = POST,
                   head_only: bool = False) -> UpstreamResponse:
        return await self.wait(pool.request(KEY, self.endpoint, data, head_only))

    async def read(self, response: UpstreamResponse) -> tuple[bytes, Failure]:
        body = Body()
        response.deliverBody(body)
        return await self.wait(body.done)

    async def fetch(self, pool: ConnectionPool) -> tuple[bytes, Failure]:
        """POST, then read the whole body."""
        return await self.read(await self.send(pool))

    def reading(self, peer: Peer) -> bool:
        """Whether the client side of ``peer``'s connection reads its socket."""
        wanted = (peer.transport.getPeer(), peer.transport.getHost())
        readers = [r for r in self.reactor.getReaders() if ITCPTransport.providedBy(r)]
        return wanted in {(r.getHost(), r.getPeer()) for r in readers}

    async def close(self) -> None:
        for pool in self.pools:
            await self.wait(pool.close())
        for peer in self.peers:
            if not peer.closed:
                peer.transport.abortConnection()
        await self.port.stopListening()


@pytest_twisted.async_yield_fixture
async def up(reactor: Any) -> AsyncIterator[Upstream]:
    """The scripted server and its pools, closed after the test."""
    upstream = Upstream(reactor)
    yield upstream
    await upstream.close()


@pytest_twisted.ensureDeferred
async def test_response_head(up: Upstream) -> None:
    """Status code, phrase, lowercase headers in order and the declared length."""
    up.script(b"HTTP/1.1 201 Created Now\r\nX-Id: 7\r\nContent-Length: 5\r\n\r\nhello")
    response = await up.send(up.pool())
    assert (response.code, response.phrase, response.length) == (201, b"Created Now", 5)
    assert response.headers == [(b"x-id", b"7"), (b"content-length", b"5")]
    assert response.header(b"x-id") == b"7" and response.header(b"x-none") is None
    assert (await up.read(response))[0] == b"hello"


@pytest.mark.parametrize("answer, length", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", 11),
    (CHUNKED, None),
    (trickle(CHUNKED), None),
    (trickle(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
             b"hello world"), 11),
], ids=["content-length", "chunked", "chunked-trickled", "content-length-trickled"])
@pytest_twisted.ensureDeferred
async def test_framed_body_then_reuse(up: Upstream, answer: Any, length: int | None) -> None:
    """A framed body arrives exactly (even split at every byte); the connection is reused."""
    up.script(answer, OK)
    pool = up.pool()
    response = await up.send(pool)
    assert response.length == length
    body, reason = await up.read(response)
    assert body == b"hello world" and reason.check(ResponseDone)
    assert pool.idle_count() == 1
    body, reason = await up.fetch(pool)
    assert body == b"ok" and reason.check(ResponseDone)
    assert len(up.peers) == 1 and up.peers[0].requests == [POST, POST]


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", PotentialDataLoss),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nuntil the end", ResponseFailed),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nd\r\nuntil the end\r\n",
     ResponseFailed),
], ids=["no-length", "short-length", "chunked-unfinished"])
@pytest_twisted.ensureDeferred
async def test_body_ended_by_close(up: Upstream, answer: bytes, expected: type) -> None:
    """A body ending with the connection is flagged as maybe cut, or failed if known short."""
    up.script(then_close(answer), OK)
    pool = up.pool()
    body, reason = await up.fetch(pool)
    assert body == b"until the end" and reason.check(expected)
    assert pool.idle_count() == 0
    assert (await up.fetch(pool))[0] == b"ok" and len(up.peers) == 2


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 099 Low\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\tFolded: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nName\t: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 10),
    b"HTTP/1.1 200 OK\r\nX-Split: a\nSet-Cookie: evil=1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Split: a\rb\r\nContent-Length: 0\r\n\r\n",
], ids=["no-code", "not-http", "code-99", "101", "no-colon", "folded", "space-before-colon",
        "tab-folded", "tab-before-colon",
        "cl-text", "cl-negative", "cl-conflict", "oversized", "bare-lf", "bare-cr"])
@pytest_twisted.ensureDeferred
async def test_bad_head_never_received(up: Upstream, answer: bytes) -> None:
    """A malformed response head fails the request and closes the connection."""
    up.script(answer)
    pool = up.pool()
    with pytest.raises(ResponseNeverReceived) as caught:
        await up.send(pool)
    assert caught.value.reasons[0].check(UpstreamProtocolError)
    await up.lost()
    assert pool.idle_count() == 0


@pytest.mark.parametrize("chunks", [
    b"zz\r\nab\r\n0\r\n\r\n",
    b"-2\r\nab\r\n0\r\n\r\n",
    b"+2\r\nab\r\n0\r\n\r\n",
    b"0x2\r\nab\r\n0\r\n\r\n",
    b"\r\nab\r\n0\r\n\r\n",
    b"2\r\nabc\r\n0\r\n\r\n",
    b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
], ids=["not-hex", "minus", "plus", "0x", "empty", "overlong-data", "underscore"])
@pytest_twisted.ensureDeferred
async def test_bad_chunk_fails_body(up: Upstream, chunks: bytes) -> None:
    """A malformed chunk fails the body with ResponseFailed and drops the connection."""
    up.script(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    pool = up.pool()
    _, reason = await up.fetch(pool)
    assert reason.check(ResponseFailed)
    assert reason.value.reasons[0].check(UpstreamProtocolError)
    await up.lost()
    assert pool.idle_count() == 0


@pytest.mark.parametrize("sent, answer, length", [
    (HEAD, b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n", None),
    (HEAD, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    (POST, b"HTTP/1.1 204 No Content\r\n\r\n", 0),
    (POST, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n", 0),
    (POST, (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0),
], ids=["head-cl", "head-chunked", "204", "304", "interim-then-empty"])
@pytest_twisted.ensureDeferred
async def test_bodyless_responses(up: Upstream, sent: bytes, answer: bytes,
                                  length: int | None) -> None:
    """HEAD, 204 and 304 have no body whatever they declare; 1xx are skipped; reused."""
    up.script(answer, OK)
    pool = up.pool()
    response = await up.send(pool, sent, head_only=sent == HEAD)
    assert response.length == length and response.code != 100
    body, reason = await up.read(response)
    assert body == b"" and reason.check(ResponseDone)
    assert (await up.fetch(pool))[0] == b"ok"
    assert up.peers[0].requests == [sent, POST]


@pytest.mark.parametrize("fresh_answers", [True, False], ids=["retried", "only-once"])
@pytest_twisted.ensureDeferred
async def test_stale_pooled_connection(up: Upstream, fresh_answers: bool) -> None:
    """A pooled connection closed as the request went out is replaced once, quietly.

    If the fresh connection closes unanswered too, the request fails.
    """
    up.script(OK, hang_up, OK if fresh_answers else hang_up)
    pool = up.pool()
    await up.fetch(pool)
    if fresh_answers:
        body, reason = await up.fetch(pool)
        assert body == b"ok" and reason.check(ResponseDone)
    else:
        with pytest.raises(ResponseNeverReceived):
            await up.send(pool)
    assert len(up.peers) == 2 and up.requests == [POST] * 3


@pytest_twisted.ensureDeferred
async def test_server_closed_idle_connection(up: Upstream) -> None:
    """After the server closed an idle keep-alive connection, the next request still works."""
    up.script(then_close(OK), OK)
    pool = up.pool()
    await up.fetch(pool)
    await up.lost()
    await up.settle()
    assert (await up.fetch(pool))[0] == b"ok" and len(up.peers) == 2


@pytest.mark.parametrize("answer, reused", [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", False),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n"
      b"2\r\nok\r\n0\r\n\r\n"), False),
], ids=["close", "http10", "http10-keep-alive", "extra-bytes", "cl-and-chunked"])
@pytest_twisted.ensureDeferred
async def test_connection_reuse_follows_response(up: Upstream, answer: bytes, reused: bool) -> None:
    """Connection: close, HTTP/1.0 and ill-framed answers close the connection after the body."""
    up.script(answer, OK)
    pool = up.pool()
    body, reason = await up.fetch(pool)
    assert body == b"ok" and reason.check(ResponseDone)
    assert pool.idle_count() == int(reused)
    if not reused:
        await up.lost()
    await up.fetch(pool)
    assert len(up.peers) == (1 if reused else 2)


@pytest_twisted.ensureDeferred
async def test_max_idle_bounds_pool(up: Upstream) -> None:
    """With max_idle=1, of two concurrent connections only one is kept afterwards."""
    up.script(OK, OK)
    pool = up.pool(max_idle=1)
    both = [pool.request(KEY, up.endpoint, POST) for _ in range(2)]
    for d in both:
        assert (await up.read(await up.wait(d)))[0] == b"ok"
    assert pool.idle_count() == 1 and len(up.peers) == 2
    await up.until(lambda: sum(peer.closed for peer in up.peers) == 1)


@pytest_twisted.ensureDeferred
async def test_idle_timeout_closes(up: Upstream) -> None:
    """An idle connection is closed once idle_timeout has passed since its last use."""
    clock = Clock()
    up.script(OK, OK)
    pool = up.pool(idle_timeout=5.0, timer=clock)
    await up.fetch(pool)
    clock.advance(3.0)
    await up.fetch(pool)  # reused: idle again from t=3
    clock.advance(4.9)
    await up.settle()
    assert pool.idle_count() == 1 and not up.peers[0].closed
    clock.advance(0.2)
    await up.lost()
    assert pool.idle_count() == 0 and not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_cancel_before_head(up: Upstream) -> None:
    """Cancelling a request still awaiting its head fails it and closes the connection."""
    up.script(silent)
    pool = up.pool()
    d = pool.request(KEY, up.endpoint, POST)
    await up.until(lambda: len(up.requests) == 1)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await up.lost()
    assert pool.idle_count() == 0


@pytest_twisted.ensureDeferred
async def test_cancel_while_connecting(up: Upstream) -> None:
    """Cancelling before the connection is up stops connecting; nothing is sent."""
    up.script(OK)
    d = up.pool().request(KEY, up.endpoint, POST)
    d.cancel()
    with pytest.raises((CancelledError, ConnectingCancelledError)):
        await d
    await up.settle()
    assert up.requests == []


@pytest.mark.parametrize("late, in_make_connection", [
    (False, False), (True, False), (False, True), (True, True),
], ids=["at-first-data", "late-at-first-data", "at-connect", "late-at-connect"])
@pytest_twisted.ensureDeferred
async def test_pause_and_resume_reading(up: Upstream, late: bool,
                                        in_make_connection: bool) -> None:
    """A consumer that pauses stops the socket being read until it resumes.

    It may pause in makeConnection or on its first data, and be attached
    at once or only after some body arrived.
    """
    up.script(FIRST)
    body = Body(None if in_make_connection else pause_at_first, paused=in_make_connection)
    response = await up.send(up.pool())
    if late:
        await up.settle()  # "first" is now held for a consumer not attached yet
    response.deliverBody(body)
    await up.wait(body.first)
    peer = up.peers[0]
    assert not up.reading(peer)
    peer.transport.write(b"again")
    for _ in range(5):
        await up.settle()
    assert body.pieces == [b"first"]
    body.transport.resumeProducing()
    assert up.reading(peer)
    data, reason = await up.wait(body.done)
    assert data == b"firstagain" and reason.check(ResponseDone)


@pytest_twisted.ensureDeferred
async def test_stop_producing_closes(up: Upstream) -> None:
    """A consumer that stops the body closes the connection and gets ResponseFailed."""
    up.script(FIRST)
    pool = up.pool()
    body = Body(on_data=lambda b: b.transport.stopProducing())
    (await up.send(pool)).deliverBody(body)
    data, reason = await up.wait(body.done)
    assert data == b"first" and reason.check(ResponseFailed)
    await up.lost()
    assert pool.idle_count() == 0


@pytest_twisted.ensureDeferred
async def test_late_read_after_reuse(up: Upstream) -> None:
    """Each response keeps its own body even if read after its connection served another."""
    up.script(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
              b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nworld")
    pool = up.pool()
    first = await up.send(pool)
    await up.settle()
    second = await up.send(pool)
    await up.settle()
    assert len(up.peers) == 1
    assert (await up.read(first))[0] == b"hello"
    assert (await up.read(second))[0] == b"world"


@pytest_twisted.ensureDeferred
async def test_pool_close(up: Upstream) -> None:
    """close() closes idle connections; a request still running is closed when it ends."""
    up.script(OK, silent)
    pool = up.pool()
    await up.fetch(pool)
    running = pool.request(("other",), up.endpoint, POST)
    await up.until(lambda: len(up.requests) == 2)
    await up.wait(pool.close())
    await up.lost(0)
    assert pool.idle_count() == 0
    up.peers[1].transport.write(OK)
    assert (await up.read(await up.wait(running)))[0] == b"ok"
    await up.lost(1)
    assert pool.idle_count() == 0


@pytest_twisted.ensureDeferred
async def test_tcp_connection_delivers_to_the_client_protocol_directly(up: Upstream) -> None:
    """Past connect, a plain TCP connection's bytes reach the client's own
    protocol, not the endpoint's forwarding wrapper (one call less per
    streamed chunk); bodies and reuse are unchanged."""
    up.script(CHUNKED, OK)
    pool = up.pool()
    body, reason = await up.fetch(pool)
    assert body == b"hello world" and reason.check(ResponseDone)
    peer = up.peers[0].transport
    wanted = (peer.getPeer(), peer.getHost())
    [client] = [r for r in up.reactor.getReaders() if ITCPTransport.providedBy(r)
                and (r.getHost(), r.getPeer()) == wanted]
    assert type(client.protocol) is _Connection
    assert (await up.fetch(pool))[0] == b"ok" and len(up.peers) == 1


@pytest_twisted.ensureDeferred
async def test_growing_demand_opens_a_spare_the_next_request_uses(up: Upstream) -> None:
    """Two requests in a row finding no idle connection (as when concurrent
    streams keep growing) make the pool open a spare connection; the next
    request is sent on it, with no connect of its own, and taking it opens
    the next spare."""
    up.script(None, None, OK)  # the first two are never answered: busy
    pool = up.pool(spare_window=SPARE_WINDOW)
    busy = [pool.request(KEY, up.endpoint, POST) for _ in range(2)]
    await up.until(lambda: len(up.peers) == 3)  # two requests' and the spare
    await up.settle()
    assert pool.idle_count() == 1
    third = await up.send(pool)
    assert (await up.read(third))[0] == b"ok"
    await up.until(lambda: len(up.peers) == 4)  # the next spare
    # The third request went on the spare: each of the first three
    # connections carried one request; the new spare none yet.
    assert [len(peer.requests) for peer in up.peers] == [1, 1, 1, 0]
    for d in busy:
        d.cancel()
        with pytest.raises(CancelledError):
            await d


@pytest_twisted.ensureDeferred
async def test_sequential_requests_open_no_spare(up: Upstream) -> None:
    """Requests one after another on a kept-alive connection find it idle:
    one connection, no spare."""
    up.script(OK, OK, OK)
    pool = up.pool(spare_window=SPARE_WINDOW)
    for _ in range(3):
        assert (await up.fetch(pool))[0] == b"ok"
    await up.settle()
    assert len(up.peers) == 1 and pool.idle_count() == 1


@pytest_twisted.ensureDeferred
async def test_no_spare_for_requests_far_apart(up: Upstream) -> None:
    """Requests that each find no idle connection but come further apart
    than the window (an upstream that closes every connection, light
    traffic) open one connection each, no spares."""
    clock = Clock()
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    up.script(close, close, close)
    pool = up.pool(timer=clock, spare_window=SPARE_WINDOW)
    for n in range(3):
        assert (await up.fetch(pool))[0] == b"ok"
        await up.lost(n)
        clock.advance(SPARE_WINDOW + 0.1)
    await up.settle()
    assert len(up.peers) == 3


@pytest_twisted.ensureDeferred
async def test_a_spare_that_cannot_connect_fails_nobody(up: Upstream, reactor: Any) -> None:
    """A spare whose connect fails is dropped quietly; each request that
    found no idle connection got (and reported) its own connect's error,
    and the next request that reaches the upstream is answered."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    refused = TCP4ClientEndpoint(reactor, "127.0.0.1", closed_port, timeout=WAIT)
    pool = up.pool(spare_window=SPARE_WINDOW)
    with pytest.raises(ConnectionRefusedError):
        await up.wait(pool.request(KEY, refused, POST))
    second = pool.request(KEY, refused, POST)  # the second miss: a spare too
    spare = pool._factory(KEY).spare
    assert spare is not None
    with pytest.raises(ConnectionRefusedError):
        await up.wait(second)
    assert await up.wait(spare) is None  # its failure handled, not raised
    assert pool._factory(KEY).spare is None and pool.idle_count() == 0
    up.script(OK)
    assert (await up.fetch(pool))[0] == b"ok"


class _Hanging:
    """An endpoint whose connects hang until cancelled."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


@pytest_twisted.ensureDeferred
async def test_closing_the_pool_stops_a_spare_being_opened(up: Upstream) -> None:
    """Closing the pool cancels a spare still connecting; nothing is left
    idle or connecting afterwards."""

    slow = _Hanging()
    pool = up.pool(spare_window=SPARE_WINDOW)
    requests = [pool.request(KEY, slow, POST) for _ in range(2)]
    assert len(slow.pending) == 3  # the spare's connect and the two requests'
    await up.wait(pool.close())
    assert slow.pending[1].called  # the spare's (opened before the second request's)
    assert pool._factory(KEY).spare is None and pool.idle_count() == 0
    for d in requests:
        d.cancel()
        with pytest.raises(CancelledError):
            await d


@pytest_twisted.ensureDeferred
async def test_a_forgotten_destination_stops_its_spare(up: Upstream, monkeypatch: Any) -> None:
    """When more destinations are in use than the pool remembers, the oldest
    one's spare being opened is cancelled with it (never left to connect
    unseen, nor doubled by a second one)."""

    slow = _Hanging()
    pool = up.pool(spare_window=SPARE_WINDOW)
    monkeypatch.setattr(pool, "MAX_KEYS", 1)
    requests = [pool.request("A", slow, POST) for _ in range(2)]
    spare = pool._factory("A").spare
    assert spare is not None and not spare.called
    requests.append(pool.request("B", slow, POST))  # A is forgotten
    assert spare.called  # cancelled
    for d in requests:
        d.cancel()
        with pytest.raises(CancelledError):
            await d
