"""A fast path in front of twisted.web for plain proxied requests.

twisted.web's HTTPChannel and Request cost a proxied request about as much
CPU as everything else llmproxy does: on the project's machine a bare proxy
served about 9,900 requests/s on raw protocols and 3,800 with twisted.web
in front. Most requests to a gateway look alike: HTTP/1.1, a small JSON
body with a Content-Length, keep-alive. :class:`FastChannel` parses those
itself, in one pass, and gives them to the
:class:`~llmproxy.proxy.ProxyResource` as a :class:`FastRequest`, which has
the part of twisted.web's ``Request`` API that the proxy uses.

Anything else goes to twisted.web's own HTTPChannel, which then serves the
rest of the connection: HTTP/1.0, HEAD, OPTIONS, chunked or large bodies,
``Expect``, ``Upgrade``, unusual header syntax, request targets that are
not ``/a/b...``, one-segment paths (``/healthz``, ``/readyz``), and every
request of a site whose root is not llmproxy's :class:`RootResource`. So
the fast path never accepts what twisted.web would refuse: when in doubt,
it hands over.
"""

from __future__ import annotations

import io
import re
import time
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES, datetimeToString

from llmproxy import _io
from llmproxy._io import no_delay, write_now

if TYPE_CHECKING:
    from llmproxy.web import LLMProxySite

__all__ = ["FastChannel", "FastRequest"]

log = Logger(namespace="llmproxy.web")

#: The largest request head handled here (twisted.web takes larger ones).
MAX_HEAD = 8 * 1024
#: The largest request body handled here (larger ones go to twisted.web,
#: which spools them to disk).
MAX_BODY = 64 * 1024
#: Bytes of a pipelined next request buffered while one is in flight
#: before the connection stops being read.
MAX_PIPELINED = 64 * 1024
#: Seconds a timed-out connection may take to close before it is aborted.
ABORT_TIMEOUT = 15.0

_METHODS = frozenset((b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"))
# A request line with an origin-form target.
_REQUEST_LINE = re.compile(rb"([A-Z]+) (/[\x21-\x7e]*) HTTP/1\.1")
# A header line: a token, a colon, a value of visible characters, spaces
# and tabs (no other control characters; the value is stripped after).
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([^\x00-\x08\x0a-\x1f\x7f]*)")
_CANONICAL: dict[bytes, bytes] = {}


def _canonical(name: bytes) -> bytes:
    """``content-type`` -> ``Content-Type`` (cached, bounded)."""
    found = _CANONICAL.get(name)
    if found is None:
        found = b"-".join(part.capitalize() for part in name.split(b"-"))
        if len(_CANONICAL) < 1024:
            _CANONICAL[name] = found
    return found


class _Clock:
    """The Date header, made once a second."""

    second = -1
    value = b""

    @classmethod
    def date(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.value = now, datetimeToString(now)
        return cls.value


class FastHeaders:
    """The subset of twisted.web's ``Headers`` that llmproxy uses.

    Names are looked up case-insensitively and written back as first given.
    """

    __slots__ = ("_raw",)

    def __init__(self) -> None:
        # lowercase name -> [name as given, values]
        self._raw: dict[bytes, list[Any]] = {}

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        entry = self._raw.get(name.lower())
        return entry[1] if entry is not None else default

    def hasHeader(self, name: bytes) -> bool:
        return name.lower() in self._raw

    def setRawHeaders(self, name: bytes, values: list[bytes]) -> None:
        self._raw[name.lower()] = [name, list(values)]

    def addRawHeader(self, name: bytes, value: bytes) -> None:
        entry = self._raw.get(name.lower())
        if entry is None:
            self._raw[name.lower()] = [name, [value]]
        else:
            entry[1].append(value)

    def removeHeader(self, name: bytes) -> None:
        self._raw.pop(name.lower(), None)

    def getAllRawHeaders(self) -> Any:
        return self._raw.values()  # [name, values] pairs


class FastRequest:
    """One request on the fast path, with twisted.web's Request interface.

    What ProxyResource uses: ``method``, ``uri``, ``path``, ``prepath``,
    ``content``, ``requestHeaders``, ``getHeader``, ``getClientAddress``,
    ``isSecure``, ``notifyFinish``, ``setResponseCode``, ``responseHeaders``,
    ``write``, ``finish``, ``registerProducer``, ``unregisterProducer``,
    ``loseConnection``, ``channel`` and ``finished``; and :meth:`when_gone`,
    which ``notifyFinish().addErrback`` would do with a Deferred.
    """

    prepath: list[bytes] = []  # the proxy is the site's root  # noqa: RUF012
    defaultContentType: bytes | None = None

    def __init__(
        self, channel: FastChannel, method: bytes, uri: bytes, headers: FastHeaders,
        body: bytes, persistent: bool,
    ) -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        self.path = uri.partition(b"?")[0]
        self.requestHeaders = headers
        self.content = io.BytesIO(body)
        self.responseHeaders = FastHeaders()
        self.code = 200
        self.code_message = b"OK"
        self.persistent = persistent
        self.started = False
        self.chunked = False
        self.finished = False
        self.gone = False
        self._notifications: list[Deferred[None]] = []
        self._on_gone: list[Any] = []

    # -- what the request said ---------------------------------------------

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self) -> Any:
        return self.channel.client_address()

    def isSecure(self) -> bool:
        return self.channel.secure

    def notifyFinish(self) -> Deferred[None]:
        """Fires when the response is finished; fails if the client left."""
        d: Deferred[None] = Deferred()
        self._notifications.append(d)
        return d

    def when_gone(self, callback: Any) -> None:
        """Call ``callback(reason)`` if the client leaves before the response
        is finished (what ``notifyFinish().addErrback(callback)`` does, without
        a Deferred per request: its machinery runs cold, once per request).
        """
        if not self.finished and not self.gone:
            self._on_gone.append(callback)

    # -- the response --------------------------------------------------------

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message or RESPONSES.get(code, b"Unknown Status")

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def _head(self) -> bytes:
        self.started = True
        headers = self.responseHeaders._raw
        parts = [b"HTTP/1.1 %d %s\r\n" % (self.code, self.code_message)]
        if b"date" not in headers:
            parts += [b"Date: ", _Clock.date(), b"\r\n"]
        if b"content-length" not in headers and self.code not in NO_BODY_CODES:
            self.chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        for name, values in headers.values():
            name = _canonical(name.lower())
            for value in values:
                parts += [name, b": ", value, b"\r\n"]
        if not self.persistent:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        if self.gone or self.finished:
            return
        # The head leaves with the first bytes of the body.
        head = b"" if self.started else self._head()
        if not data or self.code in NO_BODY_CODES:
            out = head
        elif self.chunked:
            out = b"%s%x\r\n%s\r\n" % (head, len(data), data)
        else:
            out = head + data if head else data
        if out:
            write_now(self.channel.transport, out)

    def finish(self) -> None:
        if self.gone or self.finished:
            return
        if not self.started:
            if b"content-length" not in self.responseHeaders._raw and (
                self.code not in NO_BODY_CODES
            ):
                self.responseHeaders.setRawHeaders(b"content-length", [b"0"])
            self.write(b"")
        if self.chunked:
            write_now(self.channel.transport, b"0\r\n\r\n")
        self.finished = True
        self._on_gone = []
        if self._notifications:
            notifications, self._notifications = self._notifications, []
            for d in notifications:
                d.callback(None)
        self.channel.request_done(self)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.channel.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.channel.transport.unregisterProducer()

    def loseConnection(self) -> None:
        self.persistent = False
        _io.flush()  # what was written goes out before the close
        _io.lose(self.channel.transport)

    def connection_lost(self, reason: Failure) -> None:
        """The client's connection closed before the response was finished."""
        self.gone = True
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.errback(reason)
        on_gone, self._on_gone = self._on_gone, []
        for callback in on_gone:
            try:
                callback(reason)
            except Exception:  # as a Deferred would: logged, the rest still run
                log.failure("while handling a client that left")


class FastChannel(Protocol, TimeoutMixin):
    """Serves plain HTTP/1.1 proxy requests; hands the rest to twisted.web.

    Attributes:
        site: The site (for its root resource, limits and timeout).
        peer: The client's address on a plain TCP connection, else None
            (asked of the transport per request: see :meth:`client_address`).
        secure: Whether the connection is TLS.
    """

    def __init__(self, site: LLMProxySite, addr: Any) -> None:
        self.site = site
        self.addr = addr
        self.peer: Any = None
        self.secure = False
        self.buf = b""
        # While a request's body is still arriving: the bytes needed, those
        # received, and the pieces.
        self.need = 0
        self.have = 0
        self.parts: list[bytes] = []
        self.current: FastRequest | None = None
        self.inner: Any = None
        self.paused = False
        self._abort: Any = None
        self.callLater = site.reactor.callLater  # for TimeoutMixin

    def connectionMade(self) -> None:
        no_delay(self.transport)
        # On a plain TCP connection the address the listener built this
        # channel for is the peer's (the transport would build another,
        # through attrs' validators). Behind anything else the transport is
        # asked per request: a PROXY-protocol listener (`haproxy:`) knows
        # the client only once its header has arrived.
        self.peer = self.addr if type(self.transport) is tcp.Server else None
        self.secure = ISSLTransport.providedBy(self.transport)
        self.setTimeout(self.site.timeOut)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self.need:
            # A body still arriving: collect pieces, parse once complete
            # (never re-join or re-parse per piece).
            self.parts.append(data)
            self.have += len(data)
            self.resetTimeout()
            if self.have < self.need:
                return
            data, self.parts, self.need = b"".join(self.parts), [], 0
        self.buf = self.buf + data if self.buf else data
        if self.current is not None:
            # Pipelined: wait for the request in flight (bounded).
            if len(self.buf) > MAX_PIPELINED and not self.paused:
                self.paused = True
                self.transport.pauseProducing()
            return
        self.resetTimeout()
        self._next()

    def client_address(self) -> Any:
        """The client's address (a request's ``getClientAddress``)."""
        peer = self.peer
        return peer if peer is not None else self.transport.getPeer()

    def _next(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._hand_over()
            return
        if end > MAX_HEAD:
            self._hand_over()
            return
        lines = buf[:end].split(b"\r\n")
        match = _REQUEST_LINE.fullmatch(lines[0])
        root = self.site.resource
        proxy = getattr(root, "proxy", None) if getattr(root, "fast_path", False) else None
        if match is None or proxy is None or len(lines) > 101:
            self._hand_over()
            return
        method, uri = match.groups()
        if method not in _METHODS or uri.partition(b"?")[0].count(b"/") < 2:
            self._hand_over()
            return
        headers = FastHeaders()
        raw = headers._raw
        for line in lines[1:]:
            header = _HEADER_LINE.fullmatch(line)
            if header is None:
                self._hand_over()
                return
            name, value = header.groups()
            value = value.strip(b" \t")
            lower = name.lower()
            entry = raw.get(lower)
            if entry is None:
                raw[lower] = [name, [value]]
            else:
                entry[1].append(value)
        if b"transfer-encoding" in raw or b"expect" in raw or b"upgrade" in raw:
            self._hand_over()
            return
        length = 0
        declared = raw.get(b"content-length")
        if declared is not None:
            values = declared[1]
            if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 9:
                self._hand_over()
                return
            length = int(values[0])
            limit = self.site.max_body_bytes
            if length > MAX_BODY or (limit is not None and length > limit):
                self._hand_over()
                return
        start = end + 4
        if len(buf) < start + length:
            # The body is still coming: collect it before parsing again.
            self.need, self.have, self.parts, self.buf = start + length, len(buf), [buf], b""
            return
        self.buf = buf[start + length:]
        connection = raw.get(b"connection")
        persistent = True
        if connection is not None:
            # A loop, not any() over a generator: any() closing it early
            # (on "close", the usual case) raises GeneratorExit into it.
            for value in connection[1]:
                if value.lower().find(b"close") >= 0:
                    persistent = False
                    break
        request = FastRequest(
            self, method, uri, headers, buf[start:start + length], persistent
        )
        self.current = request
        _io.active += 1
        try:
            proxy.render(request)
        except Exception:  # a bug: answer 500 rather than hang the client
            log.failure("bug while handling request {uri!r}", uri=uri)
            if not request.started:
                request.setResponseCode(500)
                request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
                request.write(b'{"error": {"message": "internal error", "type": "server_error"}}')
                request.finish()
            else:
                self.transport.abortConnection()

    def request_done(self, request: FastRequest) -> None:
        """The response is finished: next request, or close."""
        if request is not self.current:
            return
        self.current = None
        _io.active -= 1
        if not request.persistent:
            request.loseConnection()
            return
        self.resetTimeout()  # idle from now on
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()
        if self.buf:
            self.site.reactor.callLater(0, self._pipelined)

    def _pipelined(self) -> None:
        if self.current is None and self.inner is None and self.buf and self.transport.connected:
            self._next()

    def _hand_over(self) -> None:
        """Let twisted.web's HTTPChannel serve this connection from here."""
        self.setTimeout(None)
        _io.flush()  # twisted.web writes to the transport itself
        if self.need:
            self.buf, self.parts, self.need = b"".join(self.parts), [], 0
        inner = self.site.build_web_channel(self.addr)
        self.inner = inner
        inner.makeConnection(self.transport)
        data, self.buf = self.buf, b""
        if data:
            inner.dataReceived(data)

    def timeoutConnection(self) -> None:
        if self.current is not None:
            # A request in flight may take long: the idle timeout counts
            # from its end (re-armed here, reset when the request ends).
            self.setTimeout(self.site.timeOut)
            return
        log.info("Timing out client: {peer}", peer=str(self.client_address()))
        self.transport.loseConnection()
        self._abort = self.callLater(ABORT_TIMEOUT, self.transport.abortConnection)

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: B008
        self.setTimeout(None)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if self.inner is not None:
            self.inner.connectionLost(reason)
            return
        current, self.current = self.current, None
        if current is not None:
            _io.active -= 1
            if not current.finished:
                current.connection_lost(reason)
