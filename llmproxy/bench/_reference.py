"""The bench's reference proxy: twisted.web in front, Agent behind, nothing else.

``python -m llmproxy.bench._reference --port P --upstream http://127.0.0.1:U``
serves one leaf resource on 127.0.0.1:P that forwards every request (method,
path and query, end-to-end headers, body) to the upstream with an ``Agent``
over a persistent ``HTTPConnectionPool`` (llmproxy's settings: 256 idle
connections per host, 50 s idle timeout) and streams the response back as
it arrives: the response body's transport is the request's streaming
producer, so nothing is buffered. It runs on the epoll reactor and logs
only warnings and errors, to stderr: no access log, no metrics, no routing,
no limits. The bench runs it beside llmproxy on the same core, and its
figures read as what Twisted itself costs a proxy.

It uses public Twisted API only, and nothing llmproxy could not use too.
It imports nothing from llmproxy, so that no change to llmproxy moves the
reference.
Two choices are a proxy's, as llmproxy makes them: requests are never
parsed as form submissions (:class:`RawBodyRequest`: twisted.web would
otherwise parse every POST's ``Content-Type`` with the ``email`` package,
tens of microseconds a request), and the body, already in memory (twisted.web reads it
before ``render``), is written in one piece (:class:`BytesBody`:
``FileBodyProducer`` would schedule a cooperator task per request to copy
it). The Agent is Twisted's own, endpoint factory included.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

log = Logger(namespace="llmproxy.bench.reference")

#: Headers about one connection, not the message (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate", b"proxy-connection",
})
#: Request headers not forwarded: hop-by-hop ones and those the Agent writes.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length"}


def end_to_end(headers: Headers, drop: frozenset[bytes]) -> list[tuple[bytes, list[bytes]]]:
    """The headers that cross the proxy: all but ``drop`` and those the
    ``Connection`` header names."""
    named = {token.strip().lower() for value in headers.getRawHeaders(b"connection", ())
             for token in value.split(b",")}
    return [(name, values) for name, values in headers.getAllRawHeaders()
            if name.lower() not in drop and name.lower() not in named]


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory, written in one piece."""

    def __init__(self, body: bytes) -> None:
        """Wrap ``body``."""
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Write the whole body."""
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body is written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume: the body is written at once."""

    def stopProducing(self) -> None:
        """Nothing to stop: the body is written at once."""


class Relay(Protocol):
    """Writes a response body to the client as it arrives.

    Attributes:
        request: The client's request.
        gone: The client disconnected: nothing more is written.
    """

    def __init__(self, request: Request) -> None:
        """Relay to ``request``."""
        self.request = request
        self.gone = False

    def connectionMade(self) -> None:
        """The upstream connection becomes the client's producer."""
        if self.gone:
            self.transport.stopProducing()
        else:
            self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        """Pass a chunk on."""
        self.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        """Finish the response, or cut it short if the body broke off."""
        if self.gone:
            return
        self.request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self.request.finish()
        else:
            self.request.loseConnection()

    def client_left(self) -> None:
        """The client disconnected: close the upstream connection."""
        self.gone = True
        if self.transport is not None:
            self.transport.stopProducing()


class ReferenceProxy(Resource):
    """Forwards every request to one upstream and streams the response back.

    Attributes:
        upstream: The upstream's base URL (``http://host:port``).
        pool: The persistent connection pool.
        agent: The Agent over it.
    """

    isLeaf = True

    def __init__(self, reactor: Any, upstream: str) -> None:
        """Forward to ``upstream`` with ``reactor``."""
        super().__init__()
        self.upstream = upstream.rstrip("/").encode("ascii")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 256
        self.pool.cachedConnectionTimeout = 50
        self.agent = Agent(reactor, pool=self.pool)

    def render(self, request: Request) -> int:
        """Send the request upstream; answer when its response comes."""
        request.content.seek(0)
        body = request.content.read()
        headers = Headers()
        for name, values in end_to_end(request.requestHeaders, _NOT_FORWARDED):
            headers.setRawHeaders(name, values)
        sent = self.agent.request(request.method, self.upstream + request.uri, headers,
                                  BytesBody(body) if body else None)
        relay = Relay(request)

        def respond(response: IResponse) -> None:
            request.setResponseCode(response.code, response.phrase)
            request.defaultContentType = None
            for name, values in end_to_end(response.headers, HOP_BY_HOP):
                request.responseHeaders.setRawHeaders(name, values)
            if (response.length is not UNKNOWN_LENGTH and request.method != b"HEAD"
                    and response.code not in NO_BODY_CODES):
                request.responseHeaders.setRawHeaders(b"content-length",
                                                      [b"%d" % response.length])
            response.deliverBody(relay)

        def failed(reason: Failure) -> None:
            if relay.gone:  # cancelled because the client left
                return
            log.warn("upstream request failed: {why}", why=reason.getErrorMessage())
            request.setResponseCode(502)
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"bad gateway\n")
            request.finish()

        def left(reason: Failure) -> None:
            relay.client_left()
            sent.cancel()

        def bug(reason: Failure) -> None:
            log.failure("reference proxy bug", reason)
            request.loseConnection()

        request.notifyFinish().addErrback(left)
        sent.addCallbacks(respond, failed).addErrback(bug)
        return NOT_DONE_YET


class RawBodyRequest(Request):
    """A request whose body is never parsed as a form: a proxy forwards it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """A twisted.web request with ``parsePOSTFormSubmission=False``."""
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)


class QuietSite(Site):
    """A Site that writes no access log, with :class:`RawBodyRequest`."""

    requestFactory = RawBodyRequest

    def log(self, request: Request) -> None:
        """No access line."""


def main(argv: list[str] | None = None) -> None:
    """Run the reference proxy until SIGTERM or SIGINT.

    Args:
        argv: The command line; ``sys.argv[1:]`` if None.
    """
    parser = argparse.ArgumentParser(prog="python -m llmproxy.bench._reference",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--upstream", required=True, help="the upstream's base URL")
    args = parser.parse_args(argv)

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    warnings = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])
    globalLogBeginner.beginLoggingTo([warnings], redirectStandardIO=False)
    proxy = ReferenceProxy(reactor, args.upstream)
    reactor.addSystemEventTrigger("before", "shutdown", proxy.pool.closeCachedConnections)
    reactor.listenTCP(args.port, QuietSite(proxy), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
