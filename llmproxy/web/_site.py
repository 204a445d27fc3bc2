"""The Site the daemon listens with, and what it refuses before ``render``.

twisted.web's ``Site`` and ``HTTPChannel`` parse every request; the
subclasses here only add limits a gateway facing untrusted clients needs,
through their public hooks:

- :class:`_LimitedRequest`: a body over ``max_body_bytes`` gets 413 before
  it is all read; bodies are never parsed as forms.
- :class:`_GuardedChannel`: a request must arrive whole within
  ``timeouts.request_read`` of its first byte (408 otherwise), and a request
  line or head over the limits gets 414 or 431, each as a JSON error,
  instead of a silent close.
- :class:`LLMProxySite`: at ``max_connections`` open client connections the
  listening ports stop accepting until some close; the connections the
  daemon has keep being served.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from llmproxy.config import Config
from llmproxy.proxy import request_id_for, send_error, write_raw_error

__all__ = ["LLMProxySite", "build_site", "default_max_connections"]

log = Logger(namespace="llmproxy.web")

#: Open files kept back from client connections by the default
#: max_connections: listening sockets, log files, DNS, the admin listener.
RESERVED_FILES = 64
#: Seconds between two "max_connections reached" log lines.
LOG_EVERY = 10.0


def default_max_connections() -> int:
    """What the open-file limit allows: each client connection may hold an
    upstream connection too, and a few files are kept for the rest.

    Returns:
        ``(soft open-file limit - RESERVED_FILES) // 2``, at least 1; 100,000
        where the limit is unknown or unlimited.
    """
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 100_000
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(1, (soft - RESERVED_FILES) // 2)


class _LimitedRequest(Request):
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
        write_raw_error(
            self.channel.transport, 413,
            f"request body larger than max_body_bytes ({limit} bytes)",
            "invalid_request_error", "body_too_large", rid,
        )
        log.info("refused a request body over max_body_bytes; request_id={request_id}",
                 request_id=rid)


class _GuardedChannel(HTTPChannel):
    """twisted.web's channel, with a deadline per request and answers for
    heads too large.

    The deadline starts at a request's first byte, when no earlier request
    of the connection is still being answered, and ends once the request
    (head and body) is in: a client sending one byte a second cannot
    hold a connection for as long as it likes (every byte resets
    twisted.web's idle timeout, but not this).
    """

    site: LLMProxySite
    _deadline: Any = None
    _head_bytes = 0
    _refused = False
    _counted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._counted = True
        self.site.connection_opened()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self.requests:
            limit = self.site.request_read
            if limit is not None:
                self._deadline = self.callLater(limit, self._too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        # Count the head as twisted.web does, and answer 431 before its
        # own limit would close the connection with a bare 400.
        size = self._head_bytes = self._head_bytes + len(line)
        if size > self.totalHeadersSize:
            self._refuse(431, "request headers larger than "
                         f"{self.totalHeadersSize} bytes", "headers_too_large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # twisted.web makes a request's Request at its request line: none
        # yet means the request line is the one too long.
        if not self.requests:
            self._refuse(414, f"request line longer than {self.MAX_LENGTH} bytes",
                         "uri_too_long")
        else:
            self._refuse(431, f"a request header line longer than {self.MAX_LENGTH} bytes",
                         "headers_too_large")

    def allContentReceived(self) -> None:
        self._end_of_request()
        super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        self._end_of_request()
        super().connectionLost(reason)
        if self._counted:
            self._counted = False
            self.site.connection_closed()

    def _end_of_request(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        self._head_bytes = 0

    def _too_slow(self) -> None:
        self._deadline = None
        self._refuse(
            408, f"the request did not arrive within {self.site.request_read:g} s "
            "(timeouts.request_read)", "request_timeout",
        )

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer with a JSON error and close; read nothing more."""
        if self._refused:
            return
        self._refused = True
        self._end_of_request()
        rid = request_id_for(None)
        log.info("refused a request ({status} {code}) from {peer}; request_id={request_id}",
                 status=status, code=code, peer=str(self.transport.getPeer()),
                 request_id=rid)
        self.setTimeout(None)
        write_raw_error(self.transport, status, message, "invalid_request_error", code, rid)


class LLMProxySite(Site):
    """The Site llmproxy listens with.

    No tracebacks, the body size limit, the request deadline and the
    connection limit. Listeners call :meth:`watch_port` with each port
    they open, so that the site can pause it at ``max_connections``.

    Attributes:
        max_body_bytes: The largest request body accepted.
        request_read: Seconds a request may take to arrive whole (None: no
            limit).
        max_connections: Open client connections at most (None: derived
            from the open-file limit at the first connection).
        open_connections: Client connections open now.
    """

    displayTracebacks = False
    requestFactory = _LimitedRequest
    protocol = _GuardedChannel
    max_body_bytes: int | None = None
    request_read: float | None = None
    max_connections: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_connections = 0
        self._ports: list[Any] = []
        self._paused = False
        self._last_logged: float | None = None

    def log(self, request: Request) -> None:
        """Nothing: each proxied request logs one access record of its own."""

    def watch_port(self, port: Any) -> None:
        """Pause and resume ``port``'s accepting with the connection count."""
        self._ports.append(port)

    def unwatch_port(self, port: Any) -> None:
        """Forget ``port`` (it stops listening)."""
        if port in self._ports:
            self._ports.remove(port)

    def _limit(self) -> int:
        if self.max_connections is None:
            self.max_connections = default_max_connections()
        return self.max_connections

    def buildProtocol(self, addr: Any) -> Any:
        """A channel for a new connection; None (closing it) past the limit.

        A listening port accepts several connections in one go, so the last
        few of a burst may find the limit reached before the port is paused.
        """
        if self.open_connections >= self._limit():
            self._pause()
            return None
        return super().buildProtocol(addr)

    def connection_opened(self) -> None:
        """A channel started; pause accepting at the limit."""
        self.open_connections += 1
        metrics = self._metrics()
        if metrics is not None:
            metrics.client_connections.inc()
        if self.open_connections >= self._limit():
            self._pause()

    def connection_closed(self) -> None:
        """A channel ended; accept again below the limit."""
        self.open_connections -= 1
        metrics = self._metrics()
        if metrics is not None:
            metrics.client_connections.dec()
        if self._paused and self.open_connections < self._limit():
            self._paused = False
            for port in self._ports:
                port.startReading()

    def _metrics(self) -> Any:
        return getattr(self.resource, "metrics", None)

    def _pause(self) -> None:
        if self._paused:
            return
        self._paused = True
        for port in self._ports:
            port.stopReading()
        metrics = self._metrics()
        if metrics is not None:
            metrics.connection_limit_reached.inc()
        now = self.reactor.seconds()
        if self._last_logged is None or now - self._last_logged >= LOG_EVERY:
            self._last_logged = now
            log.warn(
                "max_connections ({limit}) reached: not accepting new connections "
                "until some close",
                limit=self._limit(),
            )


def build_site(config: Config, reactor: Any, resource: Resource) -> LLMProxySite:
    """Build a Site serving ``resource`` with the config's client limits.

    Args:
        config: The validated configuration.
        reactor: The reactor.
        resource: The root resource (:class:`~llmproxy.web.RootResource`,
            or the admin resource).

    Returns:
        The Site to listen with.
    """
    site = LLMProxySite(resource, reactor=reactor, timeout=config.timeouts.client_idle)
    site.max_body_bytes = config.max_body_bytes
    site.request_read = config.timeouts.request_read
    site.max_connections = config.max_connections
    return site
