"""The channel and request the daemon's Site makes: what is refused before
``render``.

twisted.web's ``HTTPChannel`` and ``Request`` parse every request; the
subclasses here only add the limits a gateway facing untrusted clients
needs, through their public hooks:

- :class:`LimitedRequest`: a body over ``max_body_bytes`` gets 413 before
  it is all read; bodies are never parsed as forms; ``*`` targets get 400.
- :class:`GuardedChannel`: a request must arrive whole within
  ``timeouts.request_read`` (of the connection's accept for its first
  request, of its first byte for the next ones: 408 otherwise); a request
  line or head over the limits, or too many header lines, gets 414 or 431;
  an HTTP/1.1 request without exactly one valid ``Host`` gets 400; each as
  a JSON error, then a close. It tells its Site when it opens, becomes idle
  between requests, becomes busy again and closes, so that the Site can
  count connections per client and close idle ones to make room.
- :class:`Refusal`: what the Site answers a connection it turns away with:
  it closes the connection as soon as it is made.
"""

from __future__ import annotations

import re
from typing import Any, Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from llmproxy.proxy import request_id_for, send_error, write_raw_error



class ChannelHost(TypingProtocol):
    """What a :class:`GuardedChannel` needs of its Site."""

    proxy_protocol: bool
    request_read: float | None

    def client_known(self, channel: GuardedChannel) -> bool:
        """The channel's client is known now (a PROXY header was read)."""

    def connection_opened(self, channel: GuardedChannel) -> None:
        """A connection was made."""

    def connection_idle(self, channel: GuardedChannel) -> None:
        """A connection waits for its next request."""

    def connection_busy(self, channel: GuardedChannel) -> None:
        """A connection's next request began."""

    def connection_closed(self, channel: GuardedChannel) -> None:
        """A connection closed."""

__all__ = ["GuardedChannel", "LimitedRequest", "Refusal"]

log = Logger(namespace="llmproxy.web")

# A connection's phases. NEW: accepted, not a byte yet. READING: a request
# is arriving. BUSY: a request is being answered. IDLE: kept alive, waiting
# for the next request. CLOSED: gone.
_NEW = "new"
_READING = "reading"
_BUSY = "busy"
_IDLE = "idle"
_CLOSED = "closed"

#: A Host header's value (RFC 9110 7.2, RFC 3986 3.2.2): an IP literal in
#: brackets or a reg-name / IPv4 address, then an optional port.
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?"
)


def host_problem(values: list[bytes] | None, http11: bool) -> str | None:
    """What is wrong with a request's ``Host`` header lines (RFC 9112 3.2).

    Args:
        values: The request's Host header values, one per line, or None.
        http11: Whether the request is HTTP/1.1 (HTTP/1.0 may omit Host).

    Returns:
        Why the request must get a 400, or None when its Host is fine.
    """
    if not values:
        return "an HTTP/1.1 request needs a Host header" if http11 else None
    if len(values) > 1:
        return f"a request may have one Host header, not {len(values)}"
    if _HOST.fullmatch(values[0]) is None:
        return "the Host header is not a host name or address with an optional port"
    return None


class LimitedRequest(Request):
    """A request whose body may not exceed the site's ``max_body_bytes``.

    twisted.web reads a whole body before ``render``: a declared
    Content-Length over the limit is refused before any of it is read, and a
    chunked body as soon as it passes the limit, with a 413 JSON error and a
    closed connection.
    """

    _refused = False
    _received = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A proxy forwards bodies as they are: never parse them as forms
        # (that costs every JSON POST a MIME header parse, and every
        # multipart upload a full parse).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    def process(self) -> None:
        """Refuse ``OPTIONS *`` (and any ``*`` target): nothing to proxy."""
        if self.path == b"*":
            rid = request_id_for(self.getHeader(b"x-request-id"))
            send_error(
                self, 400, "the '*' request target is not supported",
                "invalid_request_error", "invalid_path", rid,
            )
            return
        super().process()

    def _limit(self) -> int | None:
        return getattr(getattr(self.channel, "site", None), "max_body_bytes", None)

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if length is not None and limit is not None and length > limit:
            self._refuse(limit)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        limit = self._limit()
        if limit is not None and self._received > limit:
            self._refuse(limit)
            return
        super().handleContentChunk(data)

    def _refuse(self, limit: int) -> None:
        self._refused = True
        rid = request_id_for(self.getHeader(b"x-request-id"))
        refuse = getattr(self.channel, "refuse", None)
        message = f"request body larger than max_body_bytes ({limit} bytes)"
        if refuse is not None:
            refuse(413, message, "body_too_large", rid)
        else:
            write_raw_error(self.channel.transport, 413, message,
                            "invalid_request_error", "body_too_large", rid)


class GuardedChannel(HTTPChannel):
    """twisted.web's channel, with deadlines per request, answers for heads
    too large or without a proper Host, and its Site told of its phases.

    A new connection's first request must be whole within the site's
    ``request_read`` of the accept: a connection that never sends a byte is
    closed then, without an answer, and one that sent part of a request gets
    a 408. Each later request must be whole within ``request_read`` of its
    first byte (every byte resets twisted.web's idle timeout, but not
    this); between requests the idle timeout (``client_idle``) applies.
    Time spent answering a request never counts.

    Attributes:
        site: The Site that made the channel.
        client: The client address the connection counts against (None:
            none, or not known yet).
        counted: Whether the Site counts the connection as open.
    """

    site: ChannelHost  # the LLMProxySite
    client: str | None = None
    counted = False
    _phase = _NEW
    _deadline: IDelayedCall | None = None
    _closing: IDelayedCall | None = None
    _head_bytes = 0
    _header_lines = 0
    _http11 = True
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.connection_opened(self)
        self._start_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        phase = self._phase
        if phase is _NEW:
            self._phase = _READING  # the deadline runs since the accept
            if self.site.proxy_protocol and not self.site.client_known(self):
                self._refused = True
                self.transport.abortConnection()
                return
        elif phase is not _READING and not self.requests and data.strip(b"\r\n"):
            # The first byte of the next request; or, right after an answer,
            # the pipelined bytes twisted.web held back while it was given.
            self._begin_request()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if line and self._phase is not _READING:
            # A pipelined request read from what twisted.web had buffered.
            self._begin_request()
        # Count the head as twisted.web does, and answer 431 before its
        # own limit would close the connection with a bare 400.
        size = self._head_bytes = self._head_bytes + len(line)
        if size > self.totalHeadersSize:
            self.refuse(431, "request headers larger than "
                        f"{self.totalHeadersSize} bytes", "headers_too_large")
            return
        queued = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > queued:
            # A request line, which twisted.web accepted only as
            # "METHOD TARGET HTTP/1.x".
            self._http11 = line.endswith(b" HTTP/1.1")

    def headerReceived(self, line: bytes) -> bool:
        """Answer 431 past ``maxHeaders`` header lines, where twisted.web
        would close the connection with a bare 400."""
        if self._refused:
            return False
        self._header_lines += 1
        if self._header_lines > self.maxHeaders:
            self.refuse(431, f"more than {self.maxHeaders} request header lines",
                        "headers_too_large")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        """Refuse a request without exactly one valid Host (RFC 9112 3.2)
        before its body is read or anything is routed."""
        request = self.requests[-1]
        problem = host_problem(request.requestHeaders.getRawHeaders(b"host"), self._http11)
        if problem is not None:
            self.refuse(400, problem, "bad_host",
                        request_id_for(request.getHeader(b"x-request-id")))
            return
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        # twisted.web makes a request's Request at its request line: none
        # yet means the request line is the one too long.
        if not self.requests:
            self.refuse(414, f"request line longer than {self.MAX_LENGTH} bytes",
                        "uri_too_long")
        else:
            self.refuse(431, f"a request header line longer than {self.MAX_LENGTH} bytes",
                        "headers_too_large")

    def allContentReceived(self) -> None:
        if self._refused:
            return  # a refused request is never rendered
        self._end_of_request()
        self._phase = _BUSY
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)
        if (self._phase is _BUSY and not self.requests and self.persistent
                and not self._refused):
            self._phase = _IDLE
            self.site.connection_idle(self)

    def connectionLost(self, reason: Any) -> None:
        self._phase = _CLOSED
        self._end_of_request()
        if self._closing is not None:
            if self._closing.active():
                self._closing.cancel()
            self._closing = None
        super().connectionLost(reason)
        self.site.connection_closed(self)

    def close_idle(self) -> None:
        """Close the connection, idle between requests, to make room.

        Whatever is still being written is sent first; a client that does
        not read it is cut off after ``abortTimeout`` seconds.
        """
        self._refused = True
        self.setTimeout(None)
        self.transport.loseConnection()
        if self.abortTimeout is not None and self._closing is None:
            self._closing = self.callLater(self.abortTimeout, self.transport.abortConnection)

    def refuse(self, status: int, message: str, code: str, rid: str | None = None) -> None:
        """Answer with a JSON error and close; read nothing more.

        Args:
            status: The HTTP status.
            message: What was wrong.
            code: The error code.
            rid: The request id (None: a new one).
        """
        if self._refused:
            return
        self._refused = True
        self._end_of_request()
        rid = request_id_for(None) if rid is None else rid
        log.info("refused a request ({status} {code}) from {peer}; request_id={request_id}",
                 status=status, code=code, peer=str(self.transport.getPeer()),
                 request_id=rid)
        self.setTimeout(None)
        write_raw_error(self.transport, status, message, "invalid_request_error", code, rid)

    def _begin_request(self) -> None:
        if self._phase is _IDLE:
            self.site.connection_busy(self)
        self._phase = _READING
        self._start_deadline()

    def _start_deadline(self) -> None:
        limit = self.site.request_read
        if limit is not None and self._deadline is None:
            self._deadline = self.callLater(limit, self._too_slow)

    def _end_of_request(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        self._head_bytes = 0
        self._header_lines = 0

    def _too_slow(self) -> None:
        self._deadline = None
        if self._phase is _NEW:
            # Not a byte since the accept: nothing to answer.
            self._refused = True
            self.setTimeout(None)
            self.transport.loseConnection()
            return
        self.refuse(
            408, f"the request did not arrive within {self.site.request_read:g} s "
            "(timeouts.request_read)", "request_timeout",
        )


class Refusal(Protocol):
    """A connection turned away: closed as soon as it is made, unread."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()
