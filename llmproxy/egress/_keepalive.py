"""Upstream connections watched: how many were made, TLS handshakes in time,
and idle ones an upstream said it would close.

An upstream may announce how long it keeps an idle connection open
(``Keep-Alive: timeout=N``). Twisted's client keeps that header to itself
and its pool has one idle timeout for every destination, so a connection
could be handed out after the upstream closed it. :class:`ConnectionWatch`
wraps the endpoints connections are made with: each new connection's
protocol sits behind a :class:`~twisted.protocols.policies.ProtocolWrapper`
that reads the ``Keep-Alive`` header of the connection's first response
head (bounded; nothing else is parsed) and, whenever the connection is idle
in the pool, closes it a second before the upstream would. The pool never
hands out a connection in Twisted's ``CONNECTION_LOST`` state, so a
connection closed this way is never used again. It also counts the
connections made, so that a caller can tell a request that went out on a
new connection from one that went out on a pooled one, and bounds a TLS
connection's handshake by the connect timeout: Twisted's TLS endpoint
reports a connection as made once TCP is up, so a handshake that never
finishes would otherwise hold the request until its response-header
timeout. The connection then fails with :class:`TLSHandshakeTimeout`.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

#: The most bytes of a connection's first response head read for Keep-Alive.
MAX_HEAD = 16 * 1024
#: Seconds before the upstream's announced timeout an idle connection closes.
MARGIN = 1.0

_TIMEOUT = re.compile(rb"(?im)^keep-alive[ \t]*:[^\r\n]*?\btimeout[ \t]*=[ \t]*(\d{1,6})")
#: The state of an HTTP11ClientProtocol that the pool may hand out.
_IDLE = "QUIESCENT"


class TLSHandshakeTimeout(ConnectError):
    """A TLS handshake with an upstream did not finish in time."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args and self.args[0] else "the TLS handshake did not finish in time"


class ConnectionWatch:
    """Counts upstream connections made, and honours Keep-Alive timeouts.

    Attributes:
        made: Connections opened so far (counted when asked for).
        closed_idle: Idle connections closed before the upstream's timeout.
    """

    def __init__(self, clock: IReactorTime, idle_timeout: float) -> None:
        """Watch connections on ``clock``.

        Args:
            clock: For the idle timers.
            idle_timeout: The pool's own idle timeout: an announced timeout
                longer than it changes nothing.
        """
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.made = 0
        self.closed_idle = 0

    def wrap(
        self, endpoint: IStreamClientEndpoint, handshake: tuple[str, float] | None = None
    ) -> IStreamClientEndpoint:
        """``endpoint``, with the connections it makes counted and watched.

        Args:
            endpoint: Makes the connections.
            handshake: For a TLS endpoint, the destination's name and the
                seconds its handshake may take.
        """
        return _WatchedEndpoint(endpoint, self, handshake)


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """Makes connections through another endpoint, counting and watching them."""

    def __init__(
        self, endpoint: IStreamClientEndpoint, watch: ConnectionWatch,
        handshake: tuple[str, float] | None,
    ) -> None:
        self._endpoint = endpoint
        self._watch = watch
        self._handshake = handshake

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect ``protocolFactory``'s protocol behind a watching wrapper.

        Returns:
            Fires with the factory's own protocol (its transport is the
            wrapper), as the pool expects.
        """
        self._watch.made += 1
        wrapping = _WatchingFactory(protocolFactory, self._watch, self._handshake)
        return self._endpoint.connect(wrapping).addCallback(_unwrapped)


def _unwrapped(wrapper: Any) -> IProtocol:
    return wrapper.wrappedProtocol


class _WatchingFactory(WrappingFactory):
    """Builds :class:`_Watching` wrappers around the pool's protocols."""

    def __init__(
        self, wrappedFactory: IProtocolFactory, watch: ConnectionWatch,
        handshake: tuple[str, float] | None,
    ) -> None:
        super().__init__(wrappedFactory)
        self.watch = watch
        self.handshake = handshake

    def buildProtocol(self, addr: Any) -> _Watching | None:
        """Wrap the pool's protocol for this connection."""
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return None if wrapped is None else _Watching(self, wrapped)


@implementer(IHandshakeListener)
class _Watching(ProtocolWrapper):
    """A connection's transport for the HTTP client: it bounds the TLS
    handshake, and closes the connection when idle past what the upstream
    announced."""

    factory: _WatchingFactory

    def __init__(self, factory: _WatchingFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._head: bytes | None = b""  # None once the first head was read
        self._limit: float | None = None
        self._timer: Any = None
        self._handshake_timer: Any = None
        self._failure: Failure | None = None

    def makeConnection(self, transport: Any) -> None:
        """The connection is up; with TLS, its handshake starts its clock."""
        handshake = self.factory.handshake
        if handshake is not None:
            self._handshake_timer = self.factory.watch.clock.callLater(
                handshake[1], self._handshake_too_slow
            )
        super().makeConnection(transport)

    def handshakeCompleted(self) -> None:
        """The TLS handshake finished: stop its clock."""
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def _handshake_too_slow(self) -> None:
        self._handshake_timer = None
        assert self.factory.handshake is not None
        name, seconds = self.factory.handshake
        self._failure = Failure(TLSHandshakeTimeout(
            string=f"the TLS handshake with {name} did not finish within {seconds:g} s"
        ))
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        """Pass the bytes on; read Keep-Alive from the first head; arm the
        idle timer when the connection went back to the pool."""
        if self._head is not None:
            self._read_head(data)
        wrapped = self.wrappedProtocol
        wrapped.dataReceived(data)
        if self._limit is not None and getattr(wrapped, "state", None) == _IDLE:
            self._arm()

    def _read_head(self, data: bytes) -> None:
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0 and len(head) < MAX_HEAD:
            self._head = head
            return
        self._head = None
        found = _TIMEOUT.search(head, 0, end if end >= 0 else MAX_HEAD)
        if found is not None:
            timeout = float(found.group(1))
            if timeout < self.factory.watch.idle_timeout:
                self._limit = max(0.0, timeout - MARGIN)

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._limit)
        else:
            self._timer = self.factory.watch.clock.callLater(self._limit, self._expire)

    def _expire(self) -> None:
        self._timer = None
        wrapped = self.wrappedProtocol
        if wrapped is not None and getattr(wrapped, "state", None) == _IDLE:
            self.factory.watch.closed_idle += 1
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        """Stop the timers; the pool's protocol hears of the loss (or of the
        handshake that took too long)."""
        for timer in (self._timer, self._handshake_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._handshake_timer = None
        super().connectionLost(self._failure or reason)
