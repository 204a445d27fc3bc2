"""Small clients for loopback tests: a raw HTTP client and a body reader."""

from __future__ import annotations

import io
import time

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse


WAIT = 10.0


def step_until(reactor: Any, done: Any) -> None:
    """Step a hand-driven reactor's loop (its due timers, then a poll) until
    ``done()``; fail after 10 s.

    For tests that build their own reactor and never run it.
    """
    deadline = time.monotonic() + WAIT
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("the loop never got there")
        reactor.runUntilCurrent()
        reactor.doIteration(0.1)


class NeedleWaiter:
    """Fires Deferreds when given bytes show up in a growing buffer."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._waiting: list[tuple[bytes, int, Deferred[None]]] = []

    def feed(self, data: bytes) -> None:
        """Append ``data`` and fire the waits it satisfies."""
        self.received += data
        still = []
        for needle, count, d in self._waiting:
            if self.received.count(needle) >= count:
                d.callback(None)
            else:
                still.append((needle, count, d))
        self._waiting = still

    def wait_for(self, needle: bytes, count: int = 1) -> Deferred[None]:
        """Fire when ``needle`` has been received (``count`` times)."""
        d: Deferred[None] = Deferred()
        if self.received.count(needle) >= count:
            d.callback(None)
        else:
            self._waiting.append((needle, count, d))
        return d

    def fail_waits(self, reason: Exception | Failure) -> None:
        """Errback every pending wait (the source has ended)."""
        waiting, self._waiting = self._waiting, []
        for _, _, d in waiting:
            d.errback(reason)


class RawClient(Protocol, NeedleWaiter):
    """A TCP client that records every byte and can stop reading.

    Attributes:
        received: Everything received so far.
        first_data: Fires with the first bytes received.
        closed: Fires (with None) when the connection ends.
        reason: Why it ended, once it has.
    """

    def __init__(self) -> None:
        NeedleWaiter.__init__(self)
        self.first_data: Deferred[bytes] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.feed(data)
        if not self.first_data.called:
            self.first_data.callback(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.reason = reason
        self.closed.callback(None)


async def raw_connect(reactor: Any, base_url: str, payload: bytes) -> RawClient:
    """Connect to ``base_url``'s port on 127.0.0.1 and send ``payload``."""
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    client = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
    client.transport.write(payload)
    return client


class BodyCollector(Protocol):
    """Collects a response body, noting when each chunk arrives.

    Attributes:
        chunks: The body chunks as delivered.
        first: Fires with the first chunk.
        done: Fires with the full body on a clean end; errbacks with the
            reason (ResponseFailed, PotentialDataLoss) otherwise.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.first: Deferred[bytes] = Deferred()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if not self.first.called:
            self.first.callback(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def collect(response: IResponse) -> BodyCollector:
    """Start collecting a response's body."""
    collector = BodyCollector()
    response.deliverBody(collector)
    return collector


async def send(
    agent: Any,
    reactor: Any,
    url: str,
    body: bytes | dict | None = None,
    method: bytes = b"POST",
    headers: dict[str, str] | None = None,
) -> IResponse:
    """Send one request (JSON-encoding a dict body) and wait for headers."""
    h = Headers()
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        h.setRawHeaders(b"content-type", [b"application/json"])
    for name, value in (headers or {}).items():
        h.addRawHeader(name.encode(), value.encode())
    d = agent.request(method, url.encode(), h, FileBodyProducer(io.BytesIO(body)) if body is not None else None)
    return await d.addTimeout(WAIT, reactor)


async def fetch(
    agent: Any, reactor: Any, url: str, body: bytes | dict | None = None, **kw: Any
) -> tuple[IResponse, bytes]:
    """Send one request and read the whole body."""
    response = await send(agent, reactor, url, body, **kw)
    data = await collect(response).done.addTimeout(WAIT, reactor)
    return response, data


def header(response: IResponse, name: str) -> str | None:
    """One response header as text, or None."""
    values = response.headers.getRawHeaders(name.encode())
    return values[0].decode() if values else None
