"""A gateway on a fake clock: no sockets, every time limit driven by hand.

:class:`MemoryGateway` builds the daemon's own :class:`~llmproxy.app.Gateway`
and Site from a config, on a ``MemoryReactorClock``, with a
:class:`~llmproxy.testing.agent.MemoryAgent` as its upstream side. Clients
are the Site's real protocol on a ``StringTransport``
(:meth:`MemoryGateway.connect`); the test plays the upstream through the
agent's recorded requests and moves time with :meth:`MemoryGateway.advance`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from raw_http import Reply, parse_reply
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from llmproxy.app import Gateway
from llmproxy.config import parse_config_text
from llmproxy.testing.agent import MemoryAgent, SentRequest
from llmproxy.web import build_site

#: A config routing everything under /v1/ to one upstream.
ONE_UPSTREAM = 'target_map: {"/v1/": "http://up.test"}\n'

_ports = itertools.count(40000)


class Client:
    """One client connection to the gateway's Site, on a StringTransport."""

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self._offset = 0
        self._lost = False

    def send(self, data: bytes) -> None:
        """Bytes from the client."""
        self.protocol.dataReceived(data)

    @property
    def closed(self) -> bool:
        """Whether the gateway closed (or aborted) this connection."""
        return bool(self.transport.disconnecting or self.transport.disconnected)

    def reply(self, head_only: bool = False) -> Reply | None:
        """The next whole response, or None if it has not all arrived."""
        parsed = parse_reply(self.transport.value()[self._offset:], head_only, self.closed)
        if parsed is None:
            return None
        self._offset += parsed[1]
        return parsed[0]

    def unread(self) -> bytes:
        """What arrived after the last response read."""
        return self.transport.value()[self._offset:]

    def stop_reading(self) -> None:
        """Act as a client that reads nothing: the transport's buffer fills
        and it pauses its producer (the HTTP channel)."""
        self.transport.producer.pauseProducing()

    def read_again(self) -> None:
        """The client reads again: the transport resumes its producer."""
        self.transport.producer.resumeProducing()

    def leave(self) -> None:
        """The client drops the connection."""
        self._lost = True
        self.transport.disconnected = True
        self.protocol.connectionLost(Failure(ConnectionLost()))

    def close_completes(self) -> None:
        """The close the gateway asked for is done: the protocol hears of it
        (a StringTransport only records that a close was asked for)."""
        assert self.closed, "the gateway did not close this connection"
        if not self._lost:
            self._lost = True
            self.transport.disconnected = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def proxy_header_names(self, host: str) -> None:
        """Act as a PROXY protocol wrapper that has read a header naming
        ``host``: the connection's peer is ``host`` from now on."""
        self.transport.peerAddr = IPv4Address("TCP", host, next(_ports))


class FakePort:
    """A listening port: whether it accepts, as the Site set it.

    Attributes:
        reading: Whether the port accepts connections.
    """

    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        """Stop accepting."""
        self.reading = False

    def startReading(self) -> None:
        """Accept again."""
        self.reading = True


class MemoryGateway:
    """The gateway a config builds, on a fake clock with an in-memory upstream.

    Attributes:
        clock: The reactor everything runs on.
        agent: The upstream side: each request the gateway sends.
        gateway: The daemon's gateway (its resource, metrics, reload).
        site: The Site clients connect to.
        records: The access records logged so far.
    """

    def __init__(self, config: str = ONE_UPSTREAM) -> None:
        self.clock = MemoryReactorClock()
        self.agent = MemoryAgent(self.clock)
        parsed = parse_config_text(config + "log: {file: null}\n", environ={})
        self.gateway = Gateway(parsed, self.clock, agent=self.agent)
        self.gateway.startService()
        self.site = build_site(parsed, self.clock, self.gateway.resource)
        self.records: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "llmproxy.access":
            self.records.append(event)

    def close(self) -> None:
        """Stop listening for access records."""
        globalLogPublisher.removeObserver(self._observe)

    def connect(self, host: str = "127.0.0.1") -> Client:
        """A new client connection."""
        peer = IPv4Address("TCP", host, next(_ports))
        protocol = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return Client(protocol, transport)

    def listen(self) -> FakePort:
        """A listening port the Site pauses and resumes (as the daemon's
        listeners let it)."""
        port = FakePort()
        self.site.watch_port(port)
        return port

    def advance(self, seconds: float) -> None:
        """Move the clock (running what falls due)."""
        self.clock.advance(seconds)

    @property
    def sent(self) -> list[SentRequest]:
        """The requests sent upstream so far."""
        return self.agent.requests


def post(path: bytes = b"/v1/chat/completions", body: bytes = b'{"model": "m"}',
         *headers: bytes) -> bytes:
    """A POST with a Content-Length body."""
    lines = [b"POST %s HTTP/1.1" % path, b"Host: gw.test", b"Content-Type: application/json",
             b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@contextmanager
def memory_gateways() -> Iterator[Callable[..., MemoryGateway]]:
    """``make(config)`` builds MemoryGateways, all closed when the block ends
    (for a test's fixture)."""
    made: list[MemoryGateway] = []

    def make(config: str = ONE_UPSTREAM) -> MemoryGateway:
        gateway = MemoryGateway(config)
        made.append(gateway)
        return gateway

    try:
        yield make
    finally:
        for gateway in made:
            gateway.close()
