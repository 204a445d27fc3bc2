"""An OpenAI/Anthropic-compatible fake upstream for tests, benchmarks and demos.

See :class:`FakeUpstream` for the routes and the ``X-Fake-*`` control headers.
Run it standalone with ``python -m llmproxy.testing.upstream --port 9001``.

The work is split by concern into private modules, each importing only
those listed before it: ``_request`` holds :class:`UpstreamRequest`,
``_controls`` parses the control headers, ``_replies`` builds the JSON
replies, ``_sse`` the event streams and ``_exchange`` writes one response;
this module holds the public names and imports them all.
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from llmproxy.testing._exchange import Exchange

# Re-exported: these names have always been importable from this module.
from llmproxy.testing._replies import DEFAULT_MODEL as DEFAULT_MODEL
from llmproxy.testing._replies import EMBEDDING_DIMENSIONS as EMBEDDING_DIMENSIONS
from llmproxy.testing._replies import REPLY_TEXT as REPLY_TEXT
from llmproxy.testing._request import UpstreamRequest as UpstreamRequest

__all__ = ["FakeUpstream", "FakeUpstreamService", "UpstreamRequest", "listen", "main", "make_site"]

log = Logger()


class FakeUpstream(Resource):
    """A leaf resource faking the OpenAI and Anthropic HTTP APIs.

    Routes (JSON replies unless streaming; ``model`` echoed from the body):
    ``POST /v1/chat/completions``, ``POST /v1/responses`` and
    ``POST /v1/messages`` (SSE with ``"stream": true``),
    ``POST /v1/embeddings`` (``encoding_format`` float or base64),
    ``GET /v1/models``, any method on ``/echo[/...]`` (echoes method, uri,
    headers and body); anything else is a 404 OpenAI-shaped error.

    Control headers (invalid values get a 400 JSON error):
        X-Fake-Status: a non-2xx code answers with an OpenAI-shaped error;
            a 2xx code keeps the normal behaviour with that status.
        X-Fake-Chunks: the number of content pieces in a stream (default 5).
        X-Fake-Chunk-Delay: seconds before each streamed event but the first.
        X-Fake-Header-Delay: seconds before the response headers.
        X-Fake-Abort-After: abort the connection after N content pieces of a
            stream (before the closing events if N is the piece count), or
            after half of any other body.
        X-Fake-Body-Bytes: on any route, a 200 ``application/octet-stream``
            body of N pattern bytes from a push producer; chunked unless
            ``X-Fake-Content-Length: 1``.
        X-Fake-Response-Header: ``Name: value`` to add (repeatable).

    Args:
        reactor: An ``IReactorTime`` provider for timers and timestamps.
        max_recorded: How many requests ``requests`` keeps.

    Attributes:
        reactor: The reactor.
        requests: Recorded requests, newest last, at most ``max_recorded``.
    """

    isLeaf = True

    def __init__(self, reactor: IReactorTime, *, max_recorded: int = 1000) -> None:
        super().__init__()
        self.reactor = reactor
        self.requests: collections.deque[UpstreamRequest] = collections.deque(maxlen=max_recorded)
        self._waiters: list[Deferred[UpstreamRequest]] = []

    def next_request(self) -> Deferred[UpstreamRequest]:
        """Wait for the next request.

        Returns:
            A Deferred firing with the next request once its body was read and
            its response started. Cancelling it stops the wait.
        """
        waiter: Deferred[UpstreamRequest] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def render(self, request: Request) -> int:
        """Record the request and start its response.

        Args:
            request: The request, any method.

        Returns:
            ``NOT_DONE_YET``: the response is written asynchronously.
        """
        request.defaultContentType = None
        request.content.seek(0)
        headers = request.requestHeaders.copy()
        record = UpstreamRequest(request.method, request.uri, headers, request.content.read())
        self.requests.append(record)
        Exchange(self, request, record, log).start()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(record)
        return NOT_DONE_YET


class _Request(Request):
    """A request whose body is never parsed as a form (the fake reads JSON)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)


class _Site(Site):
    """A Site without access lines: the fake also serves the benchmark,
    where formatting one per request would make it the bottleneck."""

    requestFactory = _Request

    def log(self, request: Request) -> None:
        """No access line."""


def make_site(reactor: IReactorTime, upstream: FakeUpstream | None = None) -> Site:
    """Build a Site serving ``upstream``, or a new :class:`FakeUpstream`.

    Args:
        reactor: An ``IReactorTime`` provider.
        upstream: The resource to serve.

    Returns:
        The Site.
    """
    site = _Site(upstream if upstream is not None else FakeUpstream(reactor), reactor=reactor)
    site.noisy = False
    return site


def listen(
    reactor: IReactorTime,
    endpoint_description: str = "tcp:0:interface=127.0.0.1",
    upstream: FakeUpstream | None = None,
) -> Deferred[tuple[FakeUpstream, IListeningPort]]:
    """Serve ``upstream``, or a new :class:`FakeUpstream`, on a server endpoint.

    Args:
        reactor: The reactor (time, and whatever the endpoint needs).
        endpoint_description: A server endpoint string.
        upstream: The resource to serve.

    Returns:
        A Deferred firing with the upstream and its listening port.
    """
    resource = upstream if upstream is not None else FakeUpstream(reactor)
    endpoint = serverFromString(reactor, endpoint_description)
    return endpoint.listen(make_site(reactor, resource)).addCallback(lambda port: (resource, port))


class FakeUpstreamService(Service):
    """A service serving a fake upstream while it runs.

    Args:
        reactor: The reactor (time, and whatever the endpoint needs).
        endpoint_description: A server endpoint string.
        upstream: The resource to serve; a new one if omitted.

    Attributes:
        upstream: The served :class:`FakeUpstream`.
        port: The listening port while running, else None.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint_description: str = "tcp:0:interface=127.0.0.1",
        upstream: FakeUpstream | None = None,
    ) -> None:
        self.reactor, self.endpoint_description = reactor, endpoint_description
        self.upstream = upstream if upstream is not None else FakeUpstream(reactor)
        self.port: IListeningPort | None = None
        self._listening: Deferred[None] | None = None

    def startService(self) -> None:
        """Start listening; a failure to listen is logged."""
        super().startService()

        def listened(result: tuple[FakeUpstream, IListeningPort]) -> None:
            self.port = result[1]

        def failed(failure: Failure) -> None:
            where = self.endpoint_description
            log.failure("fake upstream: cannot listen on {where}", failure, where=where)

        d = listen(self.reactor, self.endpoint_description, self.upstream)
        self._listening = d.addCallbacks(listened, failed)

    def stopService(self) -> Deferred[None]:
        """Stop listening.

        Returns:
            A Deferred firing once the port stopped listening.
        """
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)

        def stop(_: None) -> Deferred[None] | None:
            port, self.port = self.port, None
            return None if port is None else port.stopListening()

        return listening.addCallback(stop)


def main(argv: list[str] | None = None) -> None:
    """Run a fake upstream until interrupted, logging to stdout.

    Args:
        argv: The command-line arguments; ``sys.argv[1:]`` if None.
    """
    parser = argparse.ArgumentParser(description="llmproxy's fake OpenAI/Anthropic upstream")
    parser.add_argument("--port", type=int, default=9001, help="TCP port, 0 for any")
    parser.add_argument("--interface", default="127.0.0.1", help="the address to bind")
    args = parser.parse_args(argv)

    def run(reactor: Any) -> Deferred[None]:
        observer = textFileLogObserver(sys.stdout)
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
        interface = args.interface.replace(":", "\\:")

        def started(result: tuple[FakeUpstream, IListeningPort]) -> Deferred[None]:
            address = result[1].getHost()
            log.info("fake upstream on {host}:{port}", host=address.host, port=address.port)
            return Deferred()  # never fires: run until the reactor stops

        # A backlog like real servers' (Twisted's default is 50): the
        # benchmark opens a thousand connections a second.
        return listen(
            reactor, f"tcp:{args.port}:interface={interface}:backlog=1024"
        ).addCallback(started)

    react(run)


if __name__ == "__main__":
    main()
