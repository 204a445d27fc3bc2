"""One try of a request on one upstream URL.

An :class:`Attempt` holds its URL's slot in the pool (outstanding requests,
for ``least_outstanding``) from the moment it is made until it ends, and it
ends exactly once: the pool's count is given back by a callback on
:attr:`Attempt.ended`, which fires once whatever ends the attempt (a
failure, a response thrown away, the end of the body). The wait for the
response head is bounded with ``Deferred.addTimeout``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse

from llmproxy.proxy._errors import ResponseHeaderTimeout
from llmproxy.proxy._stream import Discard
from llmproxy.routing import UpstreamPool


def _header_timeout(result: Any, timeout: float) -> Failure:
    """What a response-header timeout turns the cancelled request into."""
    return Failure(ResponseHeaderTimeout(timeout))


class Attempt:
    """One try of a request on one of a pool's URLs.

    Attributes:
        pool: The pool the URL belongs to.
        url: The upstream base URL tried.
        ended: Fires once, when the attempt is over; the pool's slot is
            given back then.
    """

    def __init__(self, pool: UpstreamPool, url: str) -> None:
        """Take ``url``'s slot in ``pool``.

        Args:
            pool: The upstream pool.
            url: The URL this attempt goes to.
        """
        self.pool = pool
        self.url = url
        self._sent: Deferred[IResponse] | None = None
        self.ended: Deferred[None] = Deferred()
        self.ended.addBoth(self._release)
        pool.started(url)

    def send(
        self,
        agent: IAgent,
        method: bytes,
        uri: bytes,
        headers: Headers,
        producer: IBodyProducer | None,
        timeout: float,
        clock: IReactorTime,
    ) -> Deferred[IResponse]:
        """Send the request; fire with the response head within ``timeout``.

        Args:
            agent: Sends it.
            method: The HTTP method.
            uri: The absolute URI.
            headers: The request headers.
            producer: Writes the request body, if there is one.
            timeout: Seconds the head may take (``timeouts.response_header``).
            clock: For the timeout.

        Returns:
            Fires with the response, or fails with why not
            (:class:`ResponseHeaderTimeout` when the time ran out).
        """
        try:
            sent = agent.request(method, uri, headers, producer)
        except Exception:
            sent = fail()
        self._sent = sent.addTimeout(timeout, clock, onTimeoutCancel=_header_timeout)
        return sent

    def cancel(self) -> None:
        """Stop waiting for the response head (the client left)."""
        if self._sent is not None:
            self._sent.cancel()  # nothing happens once it has a result

    def succeeded(self) -> None:
        """Tell the pool the upstream answered well."""
        self.pool.succeeded(self.url)

    def failed(self) -> bool:
        """Tell the pool the upstream failed.

        Returns:
            True when this failure took the URL out of the rotation.
        """
        return self.pool.failed(self.url)

    def discard(self, response: IResponse) -> None:
        """Throw ``response`` away (closing its connection) and end."""
        response.deliverBody(Discard())
        self.end()

    def end(self) -> None:
        """The attempt is over (a second call does nothing)."""
        if not self.ended.called:
            self.ended.callback(None)

    def _release(self, result: Any) -> Any:
        self.pool.finished(self.url)
        return result
