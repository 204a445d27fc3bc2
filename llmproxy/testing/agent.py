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

from collections.abc import Mapping, Sequence

from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.interfaces import IConsumer, IProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import RequestGenerationFailed, ResponseNeverReceived
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IClientRequest, IResponse
from zope.interface import implementer

from llmproxy.testing._agent_response import BodyTransport, MemoryResponse

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
        response = MemoryResponse(self, self.agent.clock, version, code, reason, headers, length)
        self.response = response
        self.deferred.callback(response)
        return response

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
