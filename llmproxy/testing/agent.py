"""An in-memory ``IAgent`` for tests on a fake clock: no sockets, answered by hand.

:class:`MemoryAgent` records each request as a :class:`SentRequest`; the
test answers it with :meth:`SentRequest.respond`, which fires the request's
Deferred with a :class:`MemoryResponse`, and then plays the upstream:
:meth:`MemoryResponse.write` body bytes, end the body one of the ways
Twisted reports (:meth:`~MemoryResponse.finish`,
:meth:`~MemoryResponse.finish_close_delimited`, :meth:`~MemoryResponse.fail`),
and watch the body's :class:`BodyTransport` for backpressure
(``paused``) and aborts (``stopped``)::

    clock = MemoryReactorClock()
    agent = MemoryAgent(clock)
    d = agent.request(b"POST", b"http://up.test/v1/chat/completions", headers, producer)
    sent = agent.requests[-1]
    response = sent.respond(200, {b"content-type": [b"text/event-stream"]})
    response.write(b"data: {}\\n\\n")
    response.finish()

It follows what Twisted's HTTP client (``twisted.web._newclient``) does,
measured against a real ``Agent`` over TCP:

- The body producer's ``startProducing`` Deferred is awaited; when it fails
  (or ``startProducing`` raises), the request fails with
  ``RequestGenerationFailed([reason])``.
- Until ``deliverBody`` the body is buffered and the transport is paused;
  ``deliverBody`` calls ``makeConnection(transport)``, delivers the buffer,
  then resumes the transport, so a pause from ``connectionMade`` does not
  stick. A body that already ended is then ended at once.
- Cancelling the request's Deferred while it waits for the response head
  fails it with ``ResponseNeverReceived([CancelledError])``; while the body
  is still being produced, the producer's Deferred is cancelled and the
  request fails with ``RequestGenerationFailed([that failure])``.
- ``transport.stopProducing()`` closes the connection as a TCP transport's
  ``loseConnection`` does: no byte is delivered after it, and the body ends
  on the clock's next turn (``clock.advance(0)``) with
  ``ResponseFailed([ConnectionDone])``. Twisted adds a private
  ``_DataLoss`` reason that this fake leaves out; for a close-delimited body
  Twisted reports ``PotentialDataLoss`` whatever ended it, which a test
  scripts with :meth:`MemoryResponse.finish_close_delimited`.
- Once the body ended, the transport is inert, as Twisted's stops proxying.

What it does not do: no ``Host``, ``Content-Length`` or other header is
added to the recorded request, and a response ``length`` is reported and
checked against what the test writes, never used to end the body by itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IProducer, IProtocol, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import RESPONSES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IClientRequest, IResponse
from zope.interface import implementer

__all__ = ["BodyTransport", "MemoryAgent", "MemoryResponse", "SentRequest"]


@implementer(IAgent)
class MemoryAgent:
    """An ``IAgent`` that records requests for the test to answer.

    Args:
        clock: The clock on which a connection closed by the response body's
            consumer (``transport.stopProducing()``) ends the body, one turn
            later (``callLater(0, ...)``), as a TCP transport's does.

    Attributes:
        clock: The clock.
        requests: Every request made, oldest first.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.requests: list[SentRequest] = []
        self._unclaimed: DeferredQueue[SentRequest] = DeferredQueue()

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """Record a request and start reading its body.

        Args:
            method: The HTTP method.
            uri: The absolute URI.
            headers: The request headers (a copy is recorded); none if None.
            bodyProducer: The body, read at once through a consumer; no body
                if None.

        Returns:
            Fires with the :class:`MemoryResponse` that
            :meth:`SentRequest.respond` makes, or fails as
            :meth:`SentRequest.fail` says, or as the producer or a
            cancellation makes it (see the module's notes).
        """
        headers = Headers() if headers is None else headers.copy()
        sent = SentRequest(self, method, uri, headers, bodyProducer)
        self.requests.append(sent)
        self._unclaimed.put(sent)  # a waiter sees the body read so far
        return sent.deferred

    def next_request(self) -> Deferred[SentRequest]:
        """Take the oldest request not taken yet by an earlier call.

        Every request is queued as it is made, so a request sent before this
        call is not missed: the first call gets the first request, the second
        call the second, and so on, whether or not they were answered.

        Returns:
            Fires with that request: at once if it was already made, else when
            it is. Cancelling it gives up the place in the queue.
        """
        return self._unclaimed.get()


@implementer(IClientRequest)
class SentRequest:
    """One request made through a :class:`MemoryAgent`, answered by the test.

    Args:
        agent: The agent that made it.
        method: The HTTP method.
        uri: The absolute URI.
        headers: The request headers.
        producer: The body, whose reading starts at once; None for none.

    Attributes:
        agent: The agent.
        method: The HTTP method.
        uri: The absolute URI (``absoluteURI`` too, for ``IClientRequest``).
        headers: A copy of the request headers given to the agent.
        body: The body bytes the producer wrote so far.
        written: True once the body was produced whole (at once without a
            producer).
        cancelled: True once the request's Deferred was cancelled before it
            had a result.
        response: The response once :meth:`respond` made it, else None.
        deferred: The Deferred the agent returned for it.
    """

    def __init__(
        self,
        agent: MemoryAgent,
        method: bytes,
        uri: bytes,
        headers: Headers,
        producer: IBodyProducer | None = None,
    ) -> None:
        self.agent, self.method, self.uri, self.headers = agent, method, uri, headers
        self.body = b""
        self.written = producer is None
        self.cancelled = False
        self.response: MemoryResponse | None = None
        self.deferred: Deferred[IResponse] = Deferred(self._cancel)
        self._producer = producer
        self._producing: Deferred[None] | None = None
        if producer is not None:
            try:
                producing = producer.startProducing(_BodyConsumer(self))
            except Exception:
                self._not_written(Failure())
            else:
                self._producing = producing
                producing.addCallbacks(self._written, self._not_written)

    @property
    def absoluteURI(self) -> bytes:
        """The absolute URI, as ``IClientRequest`` names it."""
        return self.uri

    def respond(
        self,
        code: int = 200,
        headers: Headers | Mapping[bytes, Sequence[bytes]] | None = None,
        *,
        length: int | str = UNKNOWN_LENGTH,
        phrase: bytes | None = None,
        version: tuple[bytes, int, int] = (b"HTTP", 1, 1),
    ) -> MemoryResponse:
        """Answer with a response head: the request's Deferred fires with it.

        Args:
            code: The status code.
            headers: The response headers.
            length: The body length in bytes, or ``UNKNOWN_LENGTH`` (a chunked
                or close-delimited body).
            phrase: The reason phrase; the standard one for ``code`` if None.
            version: The HTTP version.

        Returns:
            The response, whose body the test then writes and ends.

        Raises:
            RuntimeError: The request already has a result, or its body is
                still being produced.
        """
        self._check_open()
        if not self.written:
            raise RuntimeError("the request body is still being produced")
        if not isinstance(headers, Headers):
            headers = Headers(headers)
        reason = phrase if phrase is not None else RESPONSES.get(code, b"")
        self.response = MemoryResponse(self, version, code, reason, headers, length)
        self.deferred.callback(self.response)
        return self.response

    def fail(self, reason: BaseException | Failure) -> None:
        """Fail the request's Deferred, as a lost or refused connection does.

        A body still being produced is stopped, as Twisted stops writing.

        Args:
            reason: The failure, as given (for example
                ``ResponseNeverReceived([Failure(ConnectionLost())])``).

        Raises:
            RuntimeError: The request already has a result.
        """
        self._check_open()
        if not self.written and self._producer is not None:
            self._producer.stopProducing()
        self.deferred.errback(reason if isinstance(reason, Failure) else Failure(reason))

    def _check_open(self) -> None:
        if self.deferred.called:
            state = "was cancelled" if self.cancelled else "already has a result"
            raise RuntimeError(f"the request {state}")

    def _written(self, _: object) -> None:
        self.written = True

    def _not_written(self, failure: Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(RequestGenerationFailed([failure]))

    def _cancel(self, _: Deferred[IResponse]) -> None:
        self.cancelled = True
        if self.written:
            self.deferred.errback(ResponseNeverReceived([Failure(CancelledError())]))
        elif self._producing is not None:
            self._producing.cancel()  # fails it, and so the request


@implementer(IConsumer)
class _BodyConsumer:
    """Takes a request body from its producer, all of it at once."""

    def __init__(self, sent: SentRequest) -> None:
        self._sent = sent

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Nothing to do: every write is taken at once."""

    def unregisterProducer(self) -> None:
        """Nothing to do."""

    def write(self, data: bytes) -> None:
        """Add ``data`` to the body, unless the request is over."""
        if not self._sent.deferred.called:
            self._sent.body += data


@implementer(IResponse)
class MemoryResponse:
    """A response made by :meth:`SentRequest.respond`; the test plays its body.

    Args:
        request: The request it answers.
        version: The HTTP version.
        code: The status code.
        phrase: The reason phrase.
        headers: The response headers.
        length: The body length, or ``UNKNOWN_LENGTH``.

    Attributes:
        version: The HTTP version, such as ``(b"HTTP", 1, 1)``.
        code: The status code.
        phrase: The reason phrase.
        headers: The response headers.
        length: The body length, or ``UNKNOWN_LENGTH``.
        request: The :class:`SentRequest` it answers.
        previousResponse: Set by :meth:`setPreviousResponse`, else None.
        transport: The body's transport (paused until ``deliverBody``).
        protocol: The body protocol from ``deliverBody`` until the body ends.
        bytes_written: The body bytes written so far.
        ended: True once the body ended (the end may wait for
            ``deliverBody``).
    """

    def __init__(
        self,
        request: SentRequest,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | str,
    ) -> None:
        self.version, self.code, self.phrase = version, code, phrase
        self.headers, self.length, self.request = headers, length, request
        self.previousResponse: IResponse | None = None
        self.transport = BodyTransport(request.agent.clock, self._close)
        self.protocol: IProtocol | None = None
        self.bytes_written = 0
        self.ended = False
        self._buffer: list[bytes] | None = []
        self._end: Failure | None = None

    def setPreviousResponse(self, response: IResponse) -> None:
        """Set :attr:`previousResponse`.

        Args:
            response: The response this one follows (a redirect's).
        """
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:
        """Connect ``protocol`` to the body, as Twisted's ``Response`` does.

        ``protocol.makeConnection(transport)``, then the buffered bytes, then
        either the end (a body that already ended) or ``resumeProducing``.

        Args:
            protocol: Receives the body.

        Raises:
            RuntimeError: The body was already delivered.
        """
        if self._buffer is None:
            raise RuntimeError("the body was already delivered to a protocol")
        buffered, self._buffer = self._buffer, None
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        for data in buffered:
            protocol.dataReceived(data)
        if self._end is not None:
            self._lose(self._end)
        else:
            self.transport.resumeProducing()

    def write(self, data: bytes) -> None:
        """Send body bytes: delivered now, or buffered until ``deliverBody``.

        Bytes are delivered even while the transport is paused (as a read
        that is already under way is): the test honours ``paused``. After
        ``transport.stopProducing()`` they go nowhere.

        Args:
            data: The bytes.

        Raises:
            RuntimeError: The body already ended.
            ValueError: The bytes would exceed a known ``length``.
        """
        if not (self._open() and data):
            return
        total = self.bytes_written + len(data)
        if isinstance(self.length, int) and total > self.length:
            raise ValueError(f"{total} bytes written, beyond the length {self.length}")
        self.bytes_written = total
        if self._buffer is not None:
            self._buffer.append(data)
        else:
            self._protocol().dataReceived(data)

    def finish(self) -> None:
        """End the body whole: ``connectionLost(Failure(ResponseDone()))``.

        Does nothing after ``transport.stopProducing()``.

        Raises:
            RuntimeError: The body already ended.
            ValueError: Fewer bytes than a known ``length`` were written
                (Twisted never calls such a body done: :meth:`fail` it).
        """
        if not self._open():
            return
        if isinstance(self.length, int) and self.bytes_written != self.length:
            raise ValueError(f"{self.bytes_written} of {self.length} bytes written")
        self._settle(Failure(ResponseDone("Response body fully received")))

    def finish_close_delimited(self) -> None:
        """End a body without length or chunking by closing the connection.

        The protocol gets ``connectionLost(Failure(PotentialDataLoss()))``.
        Does nothing after ``transport.stopProducing()``.

        Raises:
            RuntimeError: The body already ended.
            ValueError: The response has a known ``length``.
        """
        if not self._open():
            return
        if self.length is not UNKNOWN_LENGTH:
            raise ValueError("a body with a length is not ended by a close")
        self._settle(Failure(PotentialDataLoss()))

    def fail(self, reason: BaseException | Failure | None = None) -> None:
        """Break the body off, as a lost connection does.

        Does nothing after ``transport.stopProducing()``.

        Args:
            reason: What ``connectionLost`` gets; if None,
                ``ResponseFailed([Failure(ConnectionLost())], response)``.

        Raises:
            RuntimeError: The body already ended.
        """
        if not self._open():
            return
        if reason is None:
            reason = ResponseFailed([Failure(ConnectionLost())], self)
        self._settle(reason if isinstance(reason, Failure) else Failure(reason))

    def _close(self) -> None:
        """End the body as a connection closed by its consumer ends it."""
        if not self.ended:
            self._settle(Failure(ResponseFailed([Failure(ConnectionDone())], self)))

    def _open(self) -> bool:
        """Whether the upstream side may still act; raise once the body ended.

        After ``stopProducing`` the connection is closing: what the upstream
        sends or does goes nowhere.
        """
        if self.transport.stopped:
            return False
        if self.ended:
            raise RuntimeError("the response body already ended")
        return True

    def _settle(self, reason: Failure) -> None:
        self.ended = True
        self.transport.detach()
        if self._buffer is not None:
            self._end = reason  # until deliverBody
        else:
            self._lose(reason)

    def _lose(self, reason: Failure) -> None:
        protocol, self.protocol, self._end = self._protocol(), None, None
        protocol.connectionLost(reason)

    def _protocol(self) -> IProtocol:
        assert self.protocol is not None, "no body protocol"
        return self.protocol


@implementer(IPushProducer)
class BodyTransport:
    """The transport of a :class:`MemoryResponse` body, as its protocol sees it.

    It records what the protocol (or the consumer it streams to) asks for;
    once the body ended it ignores every call, as Twisted's stops proxying.

    Args:
        clock: Where :meth:`stopProducing` schedules the close.
        close: Ends the body as a connection closed by its consumer.

    Attributes:
        paused: True while paused: from the response head until
            ``deliverBody``, then after ``pauseProducing`` until
            ``resumeProducing``.
        stopped: True once ``stopProducing`` (or ``loseConnection``) was
            called before the body ended.
        disconnecting: Always False, as on Twisted's body transport (some
            protocols read it).
    """

    disconnecting = False

    def __init__(self, clock: IReactorTime, close: Callable[[], None]) -> None:
        self._clock, self._close = clock, close
        self._detached = False
        self.paused = True
        self.stopped = False

    def detach(self) -> None:
        """Ignore every call from now on: the body ended (called by the response)."""
        self._detached = True

    def pauseProducing(self) -> None:
        """Record a pause (backpressure)."""
        if not self._detached:
            self.paused = True

    def resumeProducing(self) -> None:
        """Record a resume."""
        if not self._detached:
            self.paused = False

    def stopProducing(self) -> None:
        """Close the connection: nothing more is delivered, and the body ends
        on the clock's next turn with ``ResponseFailed([ConnectionDone])``."""
        if not (self._detached or self.stopped):
            self.stopped = True
            self._clock.callLater(0, self._close)

    def loseConnection(self) -> None:
        """The same as :meth:`stopProducing`, as on Twisted's body transport."""
        self.stopProducing()
