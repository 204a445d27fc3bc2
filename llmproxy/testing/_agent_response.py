"""A response of :class:`~llmproxy.testing.agent.MemoryAgent` and its body's
transport: :class:`MemoryResponse`, :class:`BodyTransport`.

Private to the package: :mod:`llmproxy.testing.agent` exports the names and
says how the fake follows Twisted's client.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocol, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IClientRequest, IResponse
from zope.interface import implementer


@implementer(IResponse)
class MemoryResponse:
    """A response made by :meth:`~llmproxy.testing.agent.SentRequest.respond`;
    the test plays its body.

    Args:
        request: The request it answers.
        clock: Where a close by the body's consumer is scheduled.
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
        request: The :class:`~llmproxy.testing.agent.SentRequest` it answers.
        previousResponse: Set by :meth:`setPreviousResponse`, else None.
        transport: The body's transport (paused until ``deliverBody``).
        protocol: The body protocol from ``deliverBody`` until the body ends.
        bytes_written: The body bytes written so far.
        ended: True once the body ended (the end may wait for
            ``deliverBody``).
    """

    def __init__(
        self,
        request: IClientRequest,
        clock: IReactorTime,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | str,
    ) -> None:
        self.version, self.code, self.phrase = version, code, phrase
        self.headers, self.length, self.request = headers, length, request
        self.previousResponse: IResponse | None = None
        self.transport = BodyTransport(clock, self._close)
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
