"""A raw HTTP/1.1 harness: clients for the proxy's front end, a raw upstream.

:class:`Gateways` (the ``gateways`` fixture in conftest) starts proxies
routing ``/v1/`` and ``/echo/`` to a fake upstream; :class:`Peer` is a raw
connection reading strictly parsed responses one after another.
:class:`RawServer` (the ``raw_servers`` fixture in conftest) is an upstream
that hangs up on a kept-alive connection after reading a request, as real
ones do.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from typing import Any

import attrs
from helpers import RawClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from llmproxy.testing.upstream import REPLY_TEXT

WAIT = 10.0
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-5]\d\d) ([^\r\n]*)")


@attrs.frozen
class Reply:
    """One parsed response (header names lowercased, body de-chunked)."""

    version: bytes
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        """The one value of ``name`` (asserting it is not repeated), or None."""
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def _dechunk(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at ``pos``: (body, end), or None if incomplete."""
    parts = []
    while (eol := data.find(b"\r\n", pos)) >= 0:
        size, pos = int(data[pos:eol], 16), eol + 2
        if len(data) < pos + size + 2:
            return None
        assert data[pos + size:pos + size + 2] == b"\r\n", "bad chunk framing"
        parts.append(data[pos:pos + size])
        pos += size + 2
        if size == 0:
            return b"".join(parts), pos
    return None


def parse_reply(data: bytes, head_only: bool, closed: bool) -> tuple[Reply, int] | None:
    """The first response in ``data`` and its length, or None if incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    assert match is not None, f"not a status line: {lines[0][:200]!r}"
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        assert colon and name and name == name.strip(), f"bad header line {line!r}"
        headers.append((name.lower(), value.strip()))
    reply, start = Reply(match[1], int(match[2]), headers), end + 4
    chunked, length = reply.header(b"transfer-encoding"), reply.header(b"content-length")
    assert chunked is None or length is None, "both Transfer-Encoding and Content-Length"
    if head_only or reply.status in (204, 304) or reply.status < 200:
        return reply, start
    if chunked is not None:
        assert chunked == b"chunked", chunked
        found = _dechunk(data, start)
        return None if found is None else (attrs.evolve(reply, body=found[0]), found[1])
    if length is not None:
        used = start + int(length)
        return (attrs.evolve(reply, body=data[start:used]), used) if len(data) >= used else None
    return (attrs.evolve(reply, body=data[start:]), len(data)) if closed else None


class Peer(RawClient):
    """A raw client connection that reads responses one after another."""

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.offset = 0  # where the next response starts in ``received``
        self._more: Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        more, self._more = self._more, None
        if more is not None:
            more.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:
        super().connectionLost(reason)
        self.dataReceived(b"")

    def unread(self) -> bytes:
        """Bytes received after the last response read."""
        return bytes(self.received[self.offset:])

    async def reply(self, head_only: bool = False) -> Reply:
        """Wait for the next whole response."""
        while True:
            parsed = parse_reply(self.unread(), head_only, self.closed.called)
            if parsed is not None:
                self.offset += parsed[1]
                return parsed[0]
            assert not self.closed.called, f"closed mid-response: {self.unread()[:300]!r}"
            self._more = Deferred()
            await self._more.addTimeout(WAIT, self.reactor)

    async def exchange(self, request: bytes, head_only: bool = False) -> Reply:
        """Send ``request`` and wait for its response."""
        self.transport.write(request)
        return await self.reply(head_only)

    async def wait_closed(self, seconds: float = WAIT) -> None:
        """Wait until the server closes the connection."""
        await self.closed.addTimeout(seconds, self.reactor)


@attrs.define
class Gateway:
    """A proxy's URL, its fake upstream and config, and raw connections to it."""

    url: str
    upstream: Any
    config: str
    gateways: Gateways

    async def connect(self, url: str | None = None, source: str | None = None) -> Peer:
        """A new raw connection to this proxy (or to ``url``).

        Args:
            url: Another proxy's base URL on 127.0.0.1.
            source: A loopback address to connect from (e.g. ``127.0.0.2``).
        """
        reactor = self.gateways.reactor
        peer = Peer(reactor)
        port = int((url or self.url).rsplit(":", 1)[1])
        bind = None if source is None else (source, 0)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind)
        await connectProtocol(endpoint, peer).addTimeout(WAIT, reactor)
        peer.transport.setTcpNoDelay(True)
        self.gateways.peers.append(peer)
        return peer


@attrs.define
class Gateways:
    """Starts proxies in front of fake upstreams; keeps the raw connections."""

    reactor: Any
    upstreams: Any
    proxies: Any
    peers: list[Peer] = attrs.field(factory=list)

    async def start(self, extra: str = "", endpoint: str | None = None) -> Gateway:
        """A proxy routing ``/v1/`` and ``/echo/`` to a new fake upstream.

        Args:
            extra: More config lines.
            endpoint: A server endpoint string to listen on instead of plain
                TCP (on 127.0.0.1, port 0).
        """
        upstream, base = await self.upstreams.start()
        config = f'target_map:\n  "/v1/": "{base}"\n  "/echo/": "{base}"\n' + extra
        return Gateway(await self.proxies.start(config, endpoint), upstream, config, self)

    async def close(self) -> None:
        """Abort the connections still open and wait until they are closed."""
        for peer in self.peers:
            if not peer.closed.called:
                peer.transport.abortConnection()
                await peer.wait_closed()


def http(method: bytes, target: bytes, body: bytes = b"", *headers: bytes,
         version: bytes = b"HTTP/1.1") -> bytes:
    """A request with a Content-Length body (if any) and extra header lines."""
    lines = [b"%s %s %s" % (method, target, version), b"Host: 127.0.0.1", *headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chat_body(model: str, stream: bool = False) -> bytes:
    """A chat completion request body."""
    messages = [{"role": "user", "content": "Hi"}]
    return json.dumps({"model": model, "messages": messages, "stream": stream}).encode()


def chat(model: str, *headers: bytes, stream: bool = False) -> bytes:
    """``POST /v1/chat/completions`` for ``model``."""
    return http(b"POST", b"/v1/chat/completions", chat_body(model, stream),
                b"Content-Type: application/json", *headers)


def assert_chat(reply: Reply, model: str, rid: bytes | None = None) -> None:
    """A complete, non-streamed chat completion for ``model``."""
    assert reply.status == 200, reply
    assert reply.json()["model"] == model
    assert reply.json()["choices"][0]["message"]["content"] == REPLY_TEXT
    if rid is not None:
        assert reply.header(b"x-request-id") == rid


#: The body of every answer a :class:`RawServer` gives to a request but HEAD.
RAW_ANSWER = json.dumps({"object": "chat.completion", "choices": []}).encode()


class _RawUpstream(Protocol):
    """Reads requests (Content-Length bodies) and answers or hangs up."""

    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.buffer = b""
        self.served = 0

    def connectionMade(self) -> None:
        self.server.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.server.requests.append(head.split(b"\r\n", 1)[0])
            if self.served >= self.server.answers_per_connection:
                self.transport.loseConnection()  # read it, never answer
                return
            self.served += 1
            if head.startswith(b"HEAD "):
                # The length of what a GET would get, and no body.
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
                continue
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(RAW_ANSWER), RAW_ANSWER)
            )

    def connectionLost(self, reason: Failure = None) -> None:
        self.server.closed += 1


class RawServer(Factory):
    """An upstream answering ``answers_per_connection`` requests a connection.

    Attributes:
        requests: The request line of every request it read.
        connections: Connections accepted.
        closed: Connections closed.
    """

    def __init__(self, answers_per_connection: int) -> None:
        self.answers_per_connection = answers_per_connection
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed = 0

    def buildProtocol(self, addr: Any) -> _RawUpstream:
        return _RawUpstream(self)


class _ScriptedBytes(Protocol):
    """Reads one request head, then plays its server's script."""

    def __init__(self, server: ScriptedBytes) -> None:
        self.server = server
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        self.server.requests += 1
        self.transport.write(self.server.answer)
        if self.server.close == "reset":
            # Linger 0: the close after the flush is a reset, not a FIN.
            self.transport.getHandle().setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.transport.loseConnection()
        elif self.server.close:
            self.transport.loseConnection()
        self.buffer = b""


class ScriptedBytes(Factory):
    """A raw upstream that answers every request with the same bytes.

    It can send what twisted.web never would: a head promising a body, then
    a close; a body with neither a length nor chunking, ended by a close
    (``close=True``, a FIN) or a reset (``close="reset"``).

    Attributes:
        requests: Requests received.
    """

    def __init__(self, answer: bytes, close: bool | str) -> None:
        self.answer = answer
        self.close = close
        self.requests = 0

    def buildProtocol(self, addr: Any) -> _ScriptedBytes:
        return _ScriptedBytes(self)
