"""Tests of :class:`llmproxy.testing.agent.MemoryAgent`, the in-memory IAgent.

All synchronous, on a ``MemoryReactorClock``: the fake must behave as
Twisted's HTTP client does (buffering before ``deliverBody``, the transport
resumed after it, a close on the next reactor turn, the failures Twisted
wraps), or tests built on it would pass against a client that does not exist.
The last test checks those claims against a real ``Agent`` on loopback, so
that a Twisted upgrade that changes them shows here first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted
from conftest import Upstreams, timeout
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IClientRequest, IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llmproxy.testing.agent import MemoryAgent, MemoryResponse, SentRequest

T = TypeVar("T")
URI = b"http://up.test/v1/chat/completions"


def succeeded(d: Deferred[T]) -> T:
    """The result of a Deferred that must have succeeded already.

    Args:
        d: The Deferred.

    Returns:
        Its result, which stays the Deferred's.
    """
    results: list[Any] = []
    d.addBoth(lambda result: results.append(result) or result)
    assert results, "the Deferred has not fired"
    assert not isinstance(results[0], Failure), results[0].getTraceback()
    return results[0]


def failed(d: Deferred[Any]) -> Failure:
    """The failure of a Deferred that must have failed already.

    Args:
        d: The Deferred.

    Returns:
        Its failure (now handled).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], Failure), f"it succeeded with {results[0]!r}"
    return results[0]


def pending(d: Deferred[Any]) -> bool:
    """Whether a Deferred has no result yet.

    Args:
        d: The Deferred.

    Returns:
        True if it has not fired.
    """
    return not d.called


@implementer(IBodyProducer)
class HandProducer:
    """A body producer the test drives: it writes and finishes when told.

    Attributes:
        length: ``UNKNOWN_LENGTH``.
        consumer: The consumer, once producing.
        producing: The Deferred ``startProducing`` returned.
        stopped: True once ``stopProducing`` was called.
        cancelled: True once ``producing`` was cancelled.
    """

    length = UNKNOWN_LENGTH

    def __init__(self) -> None:
        self.consumer: IConsumer | None = None
        self.producing: Deferred[None] = Deferred(self._cancel)
        self.stopped = False
        self.cancelled = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Keep the consumer; finish when the test says.

        Args:
            consumer: Takes the body.

        Returns:
            :attr:`producing`.
        """
        self.consumer = consumer
        return self.producing

    def write(self, data: bytes) -> None:
        """Write ``data`` to the consumer.

        Args:
            data: Body bytes.
        """
        assert self.consumer is not None
        self.consumer.write(data)

    def pauseProducing(self) -> None:
        """Not used."""

    def resumeProducing(self) -> None:
        """Not used."""

    def stopProducing(self) -> None:
        """Record the stop."""
        self.stopped = True

    def _cancel(self, _: Deferred[None]) -> None:
        self.cancelled = True


@implementer(IBodyProducer)
class BytesBody:
    """A body producer that writes its bytes at once, like ``BytesProducer``.

    Args:
        data: The body.
        fail_with: If set, ``startProducing`` raises it after writing.
    """

    def __init__(self, data: bytes, fail_with: Exception | None = None) -> None:
        self.data, self.length, self.fail_with = data, len(data), fail_with

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Write everything.

        Args:
            consumer: Takes the body.

        Returns:
            A fired Deferred.
        """
        consumer.write(self.data)
        if self.fail_with is not None:
            raise self.fail_with
        return succeed(None)

    def pauseProducing(self) -> None:
        """Not used."""

    def resumeProducing(self) -> None:
        """Not used."""

    def stopProducing(self) -> None:
        """Not used."""


class Recorder(Protocol):
    """A body protocol that records what happens to it, and can act back.

    Args:
        on_made: Called with the protocol from ``connectionMade``.
        on_data: Called with the protocol after each ``dataReceived``.

    Attributes:
        events: ``("made", paused)``, ``("data", bytes)`` and ``("lost",
            failure)`` in order.
    """

    def __init__(
        self,
        on_made: Callable[[Recorder], None] | None = None,
        on_data: Callable[[Recorder], None] | None = None,
    ) -> None:
        self.events: list[tuple[str, Any]] = []
        self.on_made, self.on_data = on_made, on_data

    def connectionMade(self) -> None:
        """Record the connection (and whether the transport is paused)."""
        self.events.append(("made", self.transport.paused))
        if self.on_made is not None:
            self.on_made(self)

    def dataReceived(self, data: bytes) -> None:
        """Record a chunk."""
        self.events.append(("data", data))
        if self.on_data is not None:
            self.on_data(self)

    def connectionLost(self, reason: Failure = None) -> None:
        """Record the end."""
        self.events.append(("lost", reason))

    @property
    def data(self) -> list[bytes]:
        """The chunks received."""
        return [value for kind, value in self.events if kind == "data"]

    @property
    def lost(self) -> list[Failure]:
        """The ``connectionLost`` reasons: more than one is a bug the tests catch."""
        return [value for kind, value in self.events if kind == "lost"]


@pytest.fixture
def clock() -> MemoryReactorClock:
    """A fake reactor clock."""
    return MemoryReactorClock()


@pytest.fixture
def agent(clock: MemoryReactorClock) -> MemoryAgent:
    """A MemoryAgent on the fake clock."""
    return MemoryAgent(clock)


def respond(agent: MemoryAgent, **kwargs: Any) -> tuple[SentRequest, MemoryResponse]:
    """Make a GET and answer it with a 200.

    Args:
        agent: The agent.
        **kwargs: For :meth:`SentRequest.respond`.

    Returns:
        The request and its response.
    """
    d = agent.request(b"GET", URI)
    sent = agent.requests[-1]
    response = sent.respond(200, {b"content-type": [b"text/event-stream"]}, **kwargs)
    assert succeeded(d) is response
    return sent, response


def test_provides_iagent(agent: MemoryAgent) -> None:
    """MemoryAgent declares and provides IAgent."""
    assert verifyObject(IAgent, agent)


def test_request_recorded(agent: MemoryAgent) -> None:
    """A request is recorded with a copy of its headers and its whole body."""
    headers = Headers({b"authorization": [b"Bearer k"]})
    d = agent.request(b"POST", URI, headers, BytesBody(b'{"model": "m"}'))
    headers.addRawHeader(b"x-later", b"1")
    [sent] = agent.requests
    assert verifyObject(IClientRequest, sent)
    assert (sent.method, sent.uri, sent.absoluteURI) == (b"POST", URI, URI)
    assert list(sent.headers.getAllRawHeaders()) == [(b"Authorization", [b"Bearer k"])]
    assert sent.body == b'{"model": "m"}'
    assert sent.written and not sent.cancelled and sent.response is None
    assert pending(d)


def test_request_without_body_or_headers(agent: MemoryAgent) -> None:
    """No producer means an empty body, written at once; no headers, empty ones."""
    agent.request(b"GET", URI)
    sent = agent.requests[-1]
    assert sent.body == b"" and sent.written
    assert list(sent.headers.getAllRawHeaders()) == []


def test_response_provides_iresponse(agent: MemoryAgent) -> None:
    """The response has every IResponse attribute, as Twisted's does."""
    sent, response = respond(agent, length=5)
    assert verifyObject(IResponse, response)
    assert verifyObject(IPushProducer, response.transport)
    assert response.version == (b"HTTP", 1, 1)
    assert (response.code, response.phrase, response.length) == (200, b"OK", 5)
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    assert response.request is sent and sent.response is response
    assert response.previousResponse is None
    earlier = MemoryResponse(sent, agent.clock, (b"HTTP", 1, 1), 302, b"Found", Headers(), 0)
    response.setPreviousResponse(earlier)
    assert response.previousResponse is earlier


def test_respond_phrase_and_headers(agent: MemoryAgent) -> None:
    """A given phrase and a Headers instance are kept as they are."""
    agent.request(b"GET", URI)
    headers = Headers({b"retry-after": [b"3"]})
    response = agent.requests[-1].respond(429, headers, phrase=b"Slow Down")
    assert response.headers is headers
    assert (response.code, response.phrase, response.length) == (429, b"Slow Down", UNKNOWN_LENGTH)


def test_body_buffered_until_deliver_body(agent: MemoryAgent) -> None:
    """Bytes written before deliverBody wait, then follow makeConnection."""
    _, response = respond(agent)
    response.write(b"data: 1\n\n")
    response.write(b"data: 2\n\n")
    assert response.transport.paused  # as Twisted's parser pauses it
    body = Recorder()
    response.deliverBody(body)
    assert body.events == [("made", True), ("data", b"data: 1\n\n"), ("data", b"data: 2\n\n")]
    assert body.transport is response.transport
    assert not response.transport.paused  # resumed after the buffer
    response.write(b"data: 3\n\n")
    assert body.data[-1] == b"data: 3\n\n"
    assert response.bytes_written == 27


def test_pause_in_connection_made_does_not_stick(agent: MemoryAgent) -> None:
    """A pause from connectionMade is undone after the buffer, as in Twisted."""
    _, response = respond(agent)
    response.write(b"x")
    response.deliverBody(Recorder(on_made=lambda p: p.transport.pauseProducing()))
    assert not response.transport.paused


def test_pause_and_resume_are_recorded(agent: MemoryAgent) -> None:
    """pauseProducing and resumeProducing on the transport set ``paused``."""
    _, response = respond(agent)
    body = Recorder(on_data=lambda p: p.transport.pauseProducing())
    response.deliverBody(body)
    response.write(b"chunk")
    assert response.transport.paused
    response.transport.resumeProducing()
    assert not response.transport.paused


def test_finish(agent: MemoryAgent, clock: MemoryReactorClock) -> None:
    """finish ends the body with ResponseDone; then the transport is inert."""
    _, response = respond(agent)
    body = Recorder()
    response.deliverBody(body)
    response.write(b"all")
    response.finish()
    [reason] = body.lost
    assert reason.check(ResponseDone) and response.ended and response.protocol is None
    with pytest.raises(RuntimeError):
        response.write(b"more")
    with pytest.raises(RuntimeError):
        response.finish()
    response.transport.pauseProducing()
    response.transport.stopProducing()
    assert not response.transport.paused and not response.transport.stopped
    assert clock.getDelayedCalls() == []


def test_end_before_deliver_body(agent: MemoryAgent) -> None:
    """A body that ended before deliverBody is delivered whole, then ended."""
    _, response = respond(agent)
    response.write(b"early")
    response.finish()
    body = Recorder(on_made=lambda p: p.transport.stopProducing())
    response.deliverBody(body)
    assert [kind for kind, _ in body.events] == ["made", "data", "lost"]
    assert body.lost[0].check(ResponseDone)
    assert not response.transport.stopped  # the transport was inert already


def test_deliver_body_twice(agent: MemoryAgent) -> None:
    """A second deliverBody is an error, as in Twisted."""
    _, response = respond(agent)
    response.deliverBody(Recorder())
    with pytest.raises(RuntimeError):
        response.deliverBody(Recorder())


def test_length_is_checked(agent: MemoryAgent) -> None:
    """With a length, the test can neither write more nor finish with less."""
    _, response = respond(agent, length=5)
    body = Recorder()
    response.deliverBody(body)
    response.write(b"abc")
    with pytest.raises(ValueError):
        response.finish()
    with pytest.raises(ValueError):
        response.write(b"def")
    response.write(b"de")
    response.finish()
    assert body.data == [b"abc", b"de"] and body.lost[0].check(ResponseDone)


def test_finish_close_delimited(agent: MemoryAgent) -> None:
    """A close-delimited body ends with PotentialDataLoss; one with a length can't."""
    _, response = respond(agent)
    body = Recorder()
    response.deliverBody(body)
    response.finish_close_delimited()
    assert body.lost[0].check(PotentialDataLoss)
    _, sized = respond(agent, length=0)
    with pytest.raises(ValueError):
        sized.finish_close_delimited()


def test_fail(agent: MemoryAgent) -> None:
    """fail breaks the body with ResponseFailed([ConnectionLost]), or the reason given."""
    _, response = respond(agent)
    body = Recorder()
    response.deliverBody(body)
    response.fail()
    [reason] = body.lost
    assert reason.check(ResponseFailed)
    assert [r.type for r in reason.value.reasons] == [ConnectionLost]
    assert reason.value.response is response
    _, other = respond(agent)
    other_body = Recorder()
    other.deliverBody(other_body)
    other.fail(ConnectionRefusedError())
    assert other_body.lost[0].check(ConnectionRefusedError)


def test_stop_producing_closes_on_next_turn(agent: MemoryAgent, clock: MemoryReactorClock) -> None:
    """stopProducing: nothing more arrives; the body ends on the next turn."""
    _, response = respond(agent)
    body = Recorder(on_data=lambda p: p.transport.stopProducing())
    response.deliverBody(body)
    response.write(b"first")
    assert response.transport.stopped
    assert body.lost == []  # not from inside dataReceived
    response.write(b"lost in the close")
    response.finish()  # the upstream's end goes nowhere either
    clock.advance(0)
    assert body.data == [b"first"]
    [reason] = body.lost
    assert reason.check(ResponseFailed)
    assert [r.type for r in reason.value.reasons] == [ConnectionDone]
    response.fail()  # still nothing: the connection is gone
    assert len(body.lost) == 1


def test_stop_in_connection_made(agent: MemoryAgent, clock: MemoryReactorClock) -> None:
    """Stopping from connectionMade (throwing a body away) still delivers the
    buffer, then closes on the next turn, never inside deliverBody."""
    _, response = respond(agent)
    response.write(b"buffered")
    body = Recorder(on_made=lambda p: p.transport.stopProducing())
    response.deliverBody(body)
    assert body.data == [b"buffered"] and body.lost == []
    clock.advance(0)
    assert body.lost[0].check(ResponseFailed)


def test_lose_connection_is_stop(agent: MemoryAgent, clock: MemoryReactorClock) -> None:
    """loseConnection on the body transport closes it as stopProducing does."""
    _, response = respond(agent)
    body = Recorder()
    response.deliverBody(body)
    response.transport.loseConnection()
    assert response.transport.stopped
    clock.advance(0)
    assert body.lost[0].check(ResponseFailed)


def test_cancel_while_waiting_for_the_head(agent: MemoryAgent) -> None:
    """Cancelling fails the request as Twisted does: ResponseNeverReceived([Cancelled])."""
    d = agent.request(b"GET", URI)
    sent = agent.requests[-1]
    d.cancel()
    assert sent.cancelled
    failure = failed(d)
    assert failure.check(ResponseNeverReceived)
    assert [r.type for r in failure.value.reasons] == [CancelledError]
    with pytest.raises(RuntimeError):
        sent.respond(200)


def test_cancel_after_the_head_does_nothing(agent: MemoryAgent) -> None:
    """Once the response came, cancelling is a no-op."""
    sent, response = respond(agent)
    sent.deferred.cancel()
    assert not sent.cancelled
    assert succeeded(sent.deferred) is response


def test_producer_is_awaited(agent: MemoryAgent) -> None:
    """Until startProducing's Deferred fires, the body is not whole."""
    producer = HandProducer()
    d = agent.request(b"POST", URI, None, producer)
    sent = agent.requests[-1]
    producer.write(b"part one, ")
    assert sent.body == b"part one, " and not sent.written
    with pytest.raises(RuntimeError):
        sent.respond(200)
    producer.write(b"part two")
    producer.producing.callback(None)
    assert sent.written and sent.body == b"part one, part two"
    sent.respond(200)
    assert succeeded(d).code == 200


def test_cancel_while_producing(agent: MemoryAgent) -> None:
    """Cancelling mid-body cancels the producer: RequestGenerationFailed."""
    producer = HandProducer()
    d = agent.request(b"POST", URI, None, producer)
    d.cancel()
    assert producer.cancelled and agent.requests[-1].cancelled
    failure = failed(d)
    assert failure.check(RequestGenerationFailed)
    assert [r.type for r in failure.value.reasons] == [CancelledError]


def test_producer_failure(agent: MemoryAgent) -> None:
    """A failing producer fails the request with RequestGenerationFailed."""
    producer = HandProducer()
    d = agent.request(b"POST", URI, None, producer)
    producer.producing.errback(ValueError("disk on fire"))
    failure = failed(d)
    assert failure.check(RequestGenerationFailed)
    assert [r.type for r in failure.value.reasons] == [ValueError]


def test_producer_raising(agent: MemoryAgent) -> None:
    """startProducing raising also fails the request, never the caller."""
    d = agent.request(b"POST", URI, None, BytesBody(b"x", fail_with=OSError("boom")))
    failure = failed(d)
    assert failure.check(RequestGenerationFailed)
    assert [r.type for r in failure.value.reasons] == [OSError]


def test_sent_fail(agent: MemoryAgent) -> None:
    """SentRequest.fail errbacks with the reason given, stopping a producer."""
    d = agent.request(b"GET", URI)
    agent.requests[-1].fail(ConnectionRefusedError())
    assert failed(d).check(ConnectionRefusedError)
    producer = HandProducer()
    d2 = agent.request(b"POST", URI, None, producer)
    agent.requests[-1].fail(ConnectionLost())
    assert producer.stopped and failed(d2).check(ConnectionLost)
    with pytest.raises(RuntimeError):
        agent.requests[-1].fail(ConnectionLost())


def test_next_request_is_a_queue(agent: MemoryAgent) -> None:
    """next_request hands out requests in order, even those made before it."""
    agent.request(b"GET", b"http://up.test/1")
    agent.request(b"GET", b"http://up.test/2")
    assert succeeded(agent.next_request()).uri == b"http://up.test/1"
    assert succeeded(agent.next_request()).uri == b"http://up.test/2"
    given_up, waiting = agent.next_request(), agent.next_request()
    assert pending(given_up) and pending(waiting)
    given_up.cancel()
    failed(given_up).trap(CancelledError)
    seen: list[tuple[bytes, bytes, bool]] = []
    waiting.addCallback(lambda sent: seen.append((sent.uri, sent.body, sent.written)))
    agent.request(b"POST", b"http://up.test/3", None, BytesBody(b"{}"))
    assert seen == [(b"http://up.test/3", b"{}", True)]  # the body is read before
    assert [sent.uri for sent in agent.requests][-1] == b"http://up.test/3"


class Ending(Protocol):
    """A body protocol for a real Agent that records how the body ends.

    Args:
        stop: Close the connection at the first chunk.

    Attributes:
        lost: Fires with ``[reason]`` at ``connectionLost``.
        lost_inside_stop: Whether the end came during ``stopProducing``.
    """

    def __init__(self, stop: bool) -> None:
        self.lost: Deferred[list[Failure]] = Deferred()
        self.lost_inside_stop = False
        self._stop, self._stopping = stop, False

    def dataReceived(self, data: bytes) -> None:
        """Close the connection, once, if asked to."""
        if self._stop:
            self._stop, self._stopping = False, True
            self.transport.stopProducing()
            self._stopping = False

    def connectionLost(self, reason: Failure = None) -> None:
        """Record the end."""
        self.lost_inside_stop = self._stopping
        self.lost.callback([reason])


@pytest_twisted.ensureDeferred
async def test_twisted_agrees(reactor: Any, upstreams: Upstreams) -> None:
    """A real Agent ends bodies and cancellations as MemoryAgent says it does."""
    upstream, base = await upstreams.start()
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)

    async def body_end(path: bytes, headers: dict[bytes, list[bytes]], stop: bool) -> Failure:
        sent = agent.request(b"GET", base.encode() + path, Headers(headers))
        response = await timeout(sent, reactor)
        ending = Ending(stop)
        response.deliverBody(ending)
        [reason] = await timeout(ending.lost, reactor)
        assert not ending.lost_inside_stop
        assert reason.check(ResponseFailed)
        return reason

    try:
        # stopProducing: the end comes later, as ResponseFailed([ConnectionDone, ...]).
        big = {b"x-fake-body-bytes": [b"10000000"]}
        reason = await body_end(b"/x", big, stop=True)
        assert reason.value.reasons[0].check(ConnectionDone)
        # The upstream breaks off: ResponseFailed([ConnectionLost, ...]).
        reason = await body_end(b"/echo", {b"x-fake-abort-after": [b"0"]}, stop=False)
        assert reason.value.reasons[0].check(ConnectionLost)
        # Cancelled while waiting for the head: ResponseNeverReceived([CancelledError]).
        arrived = upstream.next_request()
        slow = Headers({b"x-fake-header-delay": [b"30"]})
        d = agent.request(b"GET", base.encode() + b"/v1/models", slow)
        await timeout(arrived, reactor)
        d.cancel()
        failures: list[Failure] = []
        await timeout(d.addErrback(failures.append), reactor)
        [failure] = failures
        assert failure.check(ResponseNeverReceived)
        assert [r.type for r in failure.value.reasons] == [CancelledError]
    finally:
        await timeout(pool.closeCachedConnections(), reactor)
