"""A lean HTTP/1.1 client for upstream requests, with a keep-alive pool.

twisted.web.client's Agent cost a proxied request more CPU than the rest of
llmproxy together: a URI parse, a Headers copy, a producer and a chain of
Deferreds per request. This client does what the proxy needs and nothing
more:

- the request goes out in one ``write`` (head and body, already in memory);
- the response head is parsed in one pass once ``CRLF CRLF`` arrived;
- the body is handed on as it arrives (Content-Length, chunked, or until
  close), with the connection as the consumer's push producer;
- connections are kept per destination key, bounded in number and idle time.

It runs over any ``IStreamClientEndpoint``: TCP, TLS, and TLS inside a
CONNECT tunnel alike. This module holds one connection's protocol and the
response it parses; :mod:`llmproxy.egress._pool` keeps the connections.
Failures use twisted.web.client's exceptions
(``ResponseNeverReceived``, ``ResponseFailed``, ``ResponseDone``,
``PotentialDataLoss``) so that callers classify them as before.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from llmproxy._io import no_delay, unwrap, write_now
from llmproxy.egress._connect import host_port

if TYPE_CHECKING:
    from llmproxy.egress._pool import ConnectionPool, _Attempt

__all__ = ["UpstreamProtocolError", "UpstreamResponse"]

#: The largest response head (status line and headers) accepted.
MAX_HEAD = 64 * 1024
#: The longest chunk-size line (with extensions) or trailer section accepted.
MAX_CHUNK_LINE = 4 * 1024
#: Body bytes held for a consumer that has not been attached yet; past this
#: the connection is paused.
EARLY_LIMIT = 64 * 1024

# Connection states.
_IDLE, _HEAD, _BODY, _DEAD = range(4)
# Body framings.
_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)
# Chunked decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)

_NO_BODY_CODES = frozenset((204, 304))
#: Blanks that may not border a header name, as byte values. (On CPython
#: 3.11, ``bytes in bytes`` first tries the left side as an integer and
#: formats a TypeError it then drops: ten times the cost of this lookup.)
_BLANK = frozenset(b" \t")
# A chunk size: hex digits only (no sign, prefix or "_"), at most 2**64 - 1.
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: A chunk's size line without extensions (the fast path).
_CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")


class UpstreamProtocolError(Exception):
    """The upstream's response broke HTTP/1.1 (a bad head or chunk)."""


#: What a body consumer's connectionLost gets when the body is complete
#: (shared: consumers only check its type).
_DONE = Failure(ResponseDone("response body fully received"))


class UpstreamResponse:
    """An upstream response whose head has arrived.

    Attributes:
        code: The status code.
        phrase: The reason phrase.
        headers: ``(lowercase name, value)`` pairs in the order received,
            Content-Length and Transfer-Encoding included.
        length: The body length when the upstream declared one (and the body
            is framed by it), else None.
        egress: ``direct`` or ``proxy`` (set by the caller that routed it).
        address: ``host:port`` of the connection's peer, if known.
    """

    __slots__ = ("_conn", "_stash", "address", "code", "egress", "headers", "length", "phrase")

    def __init__(
        self, conn: _Connection, code: int, phrase: bytes,
        headers: list[tuple[bytes, bytes]], length: int | None,
    ) -> None:
        self._conn = conn
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.egress: str | None = None
        self.address = conn.address
        self._stash: tuple[list[bytes], Failure] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def deliverBody(self, protocol: Any) -> None:
        """Stream the body into ``protocol`` (an IProtocol).

        It gets ``makeConnection`` with a push producer (pause, resume, or
        stop: close the connection), then ``dataReceived`` per piece, then
        ``connectionLost`` with ResponseDone, PotentialDataLoss (the body
        ended with the connection) or ResponseFailed.
        """
        self._conn.deliver(self, protocol)


@implementer(IPushProducer)
class _BodyHandle:
    """The body consumer's view of the connection, cut off at the body's end."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _Connection | None) -> None:
        self._conn = conn

    def pauseProducing(self) -> None:
        if self._conn is not None:
            self._conn.pause()

    def resumeProducing(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    def stopProducing(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


class _Connection(Protocol):
    """One upstream connection: a request at a time, then back to the pool."""

    def __init__(self, pool: ConnectionPool, key: Hashable) -> None:
        self.pool = pool
        self.key = key
        self.state = _IDLE
        self.address: str | None = None
        self.attempt: _Attempt | None = None
        self.reused = False
        self.spare = False  # opened ahead of demand, not used yet
        self.got_bytes = False
        self.buf = b""
        self.response: UpstreamResponse | None = None
        self.framing = _NONE
        self.remaining = 0
        self.chunk_state = _SIZE
        self.keep = False
        self.consumer: Any = None
        self.handle: _BodyHandle | None = None
        # Body pieces that arrived before deliverBody (normally none).
        self.early: list[bytes] = []
        self.early_size = 0
        self.paused = False
        self.error: Exception | None = None
        self.idle_since = 0.0
        self.lost: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        no_delay(self.transport)
        unwrap(self.transport, self)
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        self.address = host_port(host, port) if host is not None and port is not None else None

    # -- the request -------------------------------------------------------

    def send(self, attempt: _Attempt) -> None:
        self.attempt = attempt
        attempt.conn = self
        self.state = _HEAD
        self.got_bytes = False
        write_now(self.transport, attempt.data)

    def abandon(self) -> None:
        """The request was cancelled before its head arrived."""
        self.attempt = None
        self.state = _DEAD
        self.transport.abortConnection()

    # -- receiving ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == _BODY:
            if self.framing == _CHUNKED:  # a stream's chunk: the hot path
                self._chunks(self.buf + data if self.buf else data)
            else:
                self._body(data)
        elif state == _HEAD:
            self.got_bytes = True
            self._head(self.buf + data if self.buf else data)
        elif state == _IDLE:
            # Bytes on an idle connection: nothing asked for them.
            self.state = _DEAD
            self.transport.abortConnection()

    def _head(self, buf: bytes) -> None:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._bad_head(f"response head over {MAX_HEAD} bytes")
                else:
                    self.buf = buf
                return
            if end > MAX_HEAD:
                self._bad_head(f"response head over {MAX_HEAD} bytes")
                return
            head = buf[:end]
            joined = head.replace(b"\r\n", b"")
            if joined.find(b"\r") >= 0 or joined.find(b"\n") >= 0 or joined.find(b"\x00") >= 0:
                # A bare CR or LF (or NUL) in a header value could split the
                # client's response: refuse it.
                self._bad_head("bare CR, LF or NUL in the response head")
                return
            lines = head.split(b"\r\n")
            buf = buf[end + 4:]
            version, _, rest = lines[0].partition(b" ")
            code_text, _, phrase = rest.partition(b" ")
            if not version.startswith(b"HTTP/1.") or len(code_text) != 3 or not code_text.isdigit():
                self._bad_head(f"bad status line {lines[0][:100]!r}")
                return
            code = int(code_text)
            if code < 100:
                self._bad_head(f"bad status line {lines[0][:100]!r}")
                return
            if code < 200:
                if code == 101:
                    self._bad_head("the upstream switched protocols")
                    return
                continue  # 100 Continue, 103 Early Hints: the answer follows
            break
        self.buf = b""
        headers = []
        length: int | None = None
        chunked = te = False
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1] in _BLANK or name[0] in _BLANK:
                self._bad_head(f"bad header line {line[:100]!r}")
                return
            name = name.lower()
            value = value.strip(b" \t")
            headers.append((name, value))
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    self._bad_head(f"bad Content-Length {value[:40]!r}")
                    return
                length = int(value)
            elif name == b"transfer-encoding":
                te = True
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            elif name == b"connection":
                tokens = value.lower()
                if tokens.find(b"close") >= 0:
                    close = True
                elif tokens.find(b"keep-alive") >= 0 and version == b"HTTP/1.0":
                    close = False
        attempt, self.attempt = self.attempt, None
        if attempt is None:  # cancelled meanwhile
            return
        if te and not chunked:
            length, close = None, True  # an unknown coding: read until close
        elif te and length is not None:
            close = True  # both framings: never reuse the connection
        if attempt.head_only or code in _NO_BODY_CODES:
            framing, length = _NONE, None if attempt.head_only else 0
        elif chunked:
            framing, length = _CHUNKED, None
            self.chunk_state = _SIZE
        elif length is not None:
            framing = _LENGTH if length else _NONE
        else:
            framing, close = _CLOSE, True
        self.framing = framing
        self.remaining = length or 0
        self.keep = not close
        response = UpstreamResponse(self, code, phrase, headers, length)
        response.egress = attempt.egress
        if response.address is None:
            response.address = attempt.address
        self.response = response
        self.state = _BODY
        attempt.conn = None
        attempt.succeed(response)
        if self.response is not response or self.state != _BODY:
            return
        if framing == _NONE:
            if buf:
                self.keep = False  # bytes after a body-less answer
            self._finish()
        elif buf:
            self._body(buf)

    def _bad_head(self, message: str) -> None:
        attempt, self.attempt = self.attempt, None
        self.state = _DEAD
        self.buf = b""
        self.transport.abortConnection()
        if attempt is not None and not attempt.settled:
            attempt.conn = None
            attempt.fail(Failure(
                ResponseNeverReceived([Failure(UpstreamProtocolError(message))])
            ))

    def _body(self, data: bytes) -> None:
        framing = self.framing
        if framing == _LENGTH:
            remaining = self.remaining
            size = len(data)
            if size < remaining:
                self.remaining = remaining - size
                self._emit(data)
                return
            if size > remaining:
                self.keep = False  # more than declared: never reuse
                data = data[:remaining]
            self.remaining = 0
            self._emit(data)
            if self.state == _BODY:
                self._finish()
        elif framing == _CHUNKED:
            self._chunks(self.buf + data if self.buf else data)
        else:  # until close
            self._emit(data)

    def _chunks(self, buf: bytes) -> None:
        position = 0
        size = len(buf)
        while position < size and self.state == _BODY:
            state = self.chunk_state
            if state == _SIZE:
                # The common case first: a whole chunk with a plain size line.
                match = _CHUNK_HEAD.match(buf, position)
                if match is not None:
                    start = match.end()
                    end = start + int(match[1], 16)
                    if end > start and buf[end:end + 2] == b"\r\n":
                        position = end + 2
                        consumer = self.consumer
                        if consumer is not None:
                            consumer.dataReceived(buf[start:end])
                        else:
                            self._emit(buf[start:end])
                        continue
            elif state == _DATA:
                take = min(self.remaining, size - position)
                piece = buf[position:position + take]
                position += take
                self.remaining -= take
                if not self.remaining:
                    self.chunk_state = _DATA_END
                self._emit(piece)
                continue
            end = buf.find(b"\r\n", position)
            if end < 0:
                if size - position > MAX_CHUNK_LINE:
                    self._bad_body("chunk line too long")
                    return
                self.buf = buf[position:]
                return
            line = buf[position:end]
            position = end + 2
            if state == _SIZE:
                text = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(text):
                    self._bad_body(f"bad chunk size {line[:40]!r}")
                    return
                chunk = int(text, 16)
                if chunk:
                    self.remaining = chunk
                    self.chunk_state = _DATA
                else:
                    self.chunk_state = _TRAILER
                    self.remaining = 0
            elif state == _DATA_END:
                if line:
                    self._bad_body("chunk data longer than its size")
                    return
                self.chunk_state = _SIZE
            else:  # trailer lines, until an empty one
                if line:
                    self.remaining += len(line)
                    if self.remaining > MAX_CHUNK_LINE:
                        self._bad_body("chunked trailer too long")
                        return
                    continue
                if position < size:
                    self.keep = False
                self.buf = b""
                self._finish()
                return
        self.buf = b""

    def _bad_body(self, message: str) -> None:
        self.error = UpstreamProtocolError(message)
        self.buf = b""
        self.abort()

    def _emit(self, data: bytes) -> None:
        consumer = self.consumer
        if consumer is not None:
            consumer.dataReceived(data)
            return
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size > EARLY_LIMIT and not self.paused:
            self.pause()

    def _end(self, reason: Failure) -> None:
        consumer, self.consumer = self.consumer, None
        handle, self.handle = self.handle, None
        if handle is not None:
            handle._conn = None
        response, self.response = self.response, None
        if consumer is not None:
            consumer.connectionLost(reason)
        elif response is not None:
            # Nobody asked for the body yet: it goes with the response, so
            # that the connection can serve the next one meanwhile.
            response._stash = (self.early, reason)
            self.early, self.early_size = [], 0

    def _finish(self) -> None:
        """The body is complete: back to the pool (or closed), then tell."""
        self.state = _IDLE
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()
        if self.keep:
            self.pool._release(self)
        else:
            self.state = _DEAD
            self.transport.loseConnection()
        self._end(_DONE)

    # -- the consumer ------------------------------------------------------

    def deliver(self, response: UpstreamResponse, consumer: Any) -> None:
        if response is not self.response:
            # The body ended (or failed) before anyone asked for it.
            consumer.makeConnection(_BodyHandle(None))
            early, end = response._stash or ([], Failure(ResponseFailed([])))
            response._stash = None
            for piece in early:
                consumer.dataReceived(piece)
            consumer.connectionLost(end)
            return
        handle = _BodyHandle(self)
        self.handle = handle
        self.consumer = consumer
        early = self.early
        if early:
            self.early, self.early_size = [], 0
            # Paused only to bound the early pieces: read on (the consumer
            # pauses again as it sees fit; data arrives only later).
            self.resume()
        consumer.makeConnection(handle)
        for piece in early:
            if self.consumer is None:
                break
            consumer.dataReceived(piece)

    def pause(self) -> None:
        if not self.paused and self.state != _DEAD:
            self.paused = True
            self.transport.pauseProducing()

    def resume(self) -> None:
        if self.paused and self.state != _DEAD:
            self.paused = False
            self.transport.resumeProducing()

    def abort(self) -> None:
        """Stop receiving this body: close the connection."""
        self.keep = False
        if self.state == _BODY:
            self.state = _DEAD
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        state = self.state
        self.state = _DEAD
        self.pool._forget(self)
        if state == _HEAD:
            attempt, self.attempt = self.attempt, None
            if attempt is None or attempt.settled:
                pass
            elif self.reused and not self.got_bytes and not attempt.retried:
                attempt.stale()
            else:
                attempt.conn = None
                attempt.fail(Failure(ResponseNeverReceived([reason])))
        elif self.response is not None:
            if self.error is not None:
                self._end(Failure(ResponseFailed([Failure(self.error)])))
            elif state == _BODY and self.framing == _CLOSE and reason.check(ConnectionDone):
                self._end(Failure(PotentialDataLoss()))
            else:
                self._end(Failure(ResponseFailed([reason])))
        waiting, self.lost = self.lost, []
        for d in waiting:
            d.callback(None)
