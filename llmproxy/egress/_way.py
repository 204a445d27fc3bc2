"""One way out of the machine (direct, through the proxy, tunnelled), and
what it answers with.

A :class:`Way` sends a request with Twisted's client over its persistent
pool and answers with a :class:`RoutedResponse` naming the way and the
address it connected to. It sends a request a second time in two cases
only, both on a connection of its own:

- Twisted's :class:`~twisted.web.client.RequestNotSent`: the pooled
  connection was found closed before a byte of the request was written;
- a stale pooled connection: the request went out on a connection taken
  from the pool (not a new one), and that connection closed before a single
  response byte came back (``ResponseNeverReceived`` or
  ``RequestTransmissionFailed`` with the peer's close as the reason). That
  is how an upstream that closes idle or used connections without saying
  so shows itself; nginx and browsers retry the same case. The upstream may
  have read the request before it closed, so the retry can be a request it
  sees twice: it happens once at most, on a new connection, is logged, and
  is counted (:attr:`RoutedResponse.retried`, or a
  :class:`StaleConnectionRetried` failure). Body-less idempotent requests
  are left to Twisted, which retries those itself.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse

from llmproxy.egress._body import BytesProducer
from llmproxy.egress._keepalive import ConnectionWatch

log = Logger(namespace="llmproxy.egress")

#: Methods Twisted's pool itself resends (without a body) on a new connection.
_TWISTED_RETRIES = frozenset((b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"))


class RoutedResponse(proxyForInterface(IResponse, "response")):  # type: ignore[misc]
    """An upstream response that knows how it was reached.

    Attributes:
        response: Twisted's response.
        egress: ``direct`` or ``proxy``.
        address: ``host:port`` the connection went to: the upstream's when
            direct, the proxy's otherwise.
        retried: Whether the request was sent a second time, on a new
            connection, after a stale pooled one closed on it.
    """

    def __init__(
        self, response: IResponse, egress: str, address: str, retried: bool = False
    ) -> None:
        self.response = response
        self.egress = egress
        self.address = address
        self.retried = retried


class StaleConnectionRetried(ResponseNeverReceived):
    """A request retried after a stale pooled connection failed again: its
    ``reasons`` are why the retry failed."""


def _closed_before_answering(failure: Failure) -> bool:
    """Whether the connection closed under the request before any response
    byte (and not because the request was cancelled)."""
    if not failure.check(ResponseNeverReceived, RequestTransmissionFailed):
        return False
    reasons = getattr(failure.value, "reasons", ())
    return any(r.check(ConnectionDone, ConnectionLost) for r in reasons) and not any(
        r.check(CancelledError) for r in reasons
    )


def _attempt(
    agent: IAgent, method: bytes, uri: bytes, headers: Headers,
    producer: IBodyProducer | None,
) -> Deferred[IResponse]:
    """``agent.request``, with anything it raises as the Deferred's failure.

    An endpoint that cannot be made (a TLS name the IDNA rules refuse, say)
    raises inside ``Agent.request``.
    """
    try:
        return agent.request(method, uri, headers, producer)
    except Exception:
        return fail()


class Way:
    """One way out: an agent over a persistent pool, and one making a new
    connection per request for the resends.

    Attributes:
        name: ``direct`` or ``proxy``, as responses name it.
    """

    def __init__(
        self, name: str, pooled: IAgent, fresh: IAgent, watch: ConnectionWatch
    ) -> None:
        """Set up the way.

        Args:
            name: ``direct`` or ``proxy``.
            pooled: Sends over the way's persistent pool.
            fresh: Sends over new connections (a non-persistent pool).
            watch: Counts the connections the way makes.
        """
        self.name = name
        self._pooled = pooled
        self._fresh = fresh
        self._watch = watch

    def send(
        self, address: str, method: bytes, uri: bytes, headers: Headers,
        producer: IBodyProducer | None,
    ) -> Deferred[RoutedResponse]:
        """Send a request this way (see the module's docstring for resends).

        Args:
            address: Where the connection goes, for the response.
            method: The HTTP method.
            uri: The absolute URI.
            headers: The request headers.
            producer: The body, if any.

        Returns:
            Fires with the response once its head arrived, or fails.
        """
        made = self._watch.made
        sent = _attempt(self._pooled, method, uri, headers, producer)
        reused = self._watch.made == made
        name = self.name

        def failed(failure: Failure) -> Any:
            if failure.check(RequestNotSent):
                log.debug("request to {address} not sent on a pooled connection; "
                          "sending it on another", address=address)
                return _attempt(self._fresh, method, uri, headers, producer).addCallback(
                    RoutedResponse, name, address
                )
            if not (reused and _closed_before_answering(failure)
                    and (producer is None or isinstance(producer, BytesProducer))
                    and not (producer is None and method in _TWISTED_RETRIES)):
                return failure
            log.info(
                "a pooled connection to {address} closed before answering a request: "
                "sending it once more on a new connection",
                address=address,
            )
            return _attempt(self._fresh, method, uri, headers, producer).addCallbacks(
                RoutedResponse, _retry_failed, callbackArgs=(name, address, True)
            )

        return sent.addCallbacks(RoutedResponse, failed, callbackArgs=(name, address))


def _retry_failed(failure: Failure) -> Failure:
    return Failure(StaleConnectionRetried([failure]))
