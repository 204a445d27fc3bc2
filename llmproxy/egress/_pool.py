"""The keep-alive pool of llmproxy's upstream HTTP/1.1 client.

Connections (:class:`~llmproxy.egress._http._Connection`) are kept per
destination key, bounded in number per key and in idle time; one timer
sweeps out the idle ones. A request takes the most recently used idle
connection, or opens one through the endpoint it was given.

While demand for a destination grows (two requests in a row found no idle
connection, within :data:`SPARE_WINDOW`), the pool opens one spare
connection ahead of it, and another each time a request takes the spare
and leaves no idle connection behind: the next request then finds its
connection open instead of waiting for a handshake (a TCP connect on a
LAN, a TLS handshake through the outbound proxy on the internet). At most
one spare is being opened per destination; an open spare is an idle
connection like any other (closed after ``idle_timeout`` if unused,
counted in ``max_idle``); steady or sequential traffic, which finds idle
connections, opens none.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from llmproxy.egress._http import _DEAD, _IDLE, UpstreamResponse, _Connection

__all__ = ["SPARE_WINDOW", "ConnectionPool"]

#: Seconds: a request finding no idle connection this soon after the last
#: one that found none means demand is growing (a spare is opened).
SPARE_WINDOW = 1.0


class _Attempt:
    """One request being sent: connect (or reuse), write, await the head.

    It ends once, through ``on_response`` or ``on_failure`` (plain calls: a
    proxied request needs no Deferred here). :meth:`cancel` ends it with a
    CancelledError.
    """

    __slots__ = (
        "address",
        "conn",
        "connecting",
        "data",
        "egress",
        "endpoint",
        "head_only",
        "key",
        "on_failure",
        "on_response",
        "pool",
        "retried",
        "settled",
    )

    def __init__(self, pool: ConnectionPool, key: Hashable, endpoint: IStreamClientEndpoint,
                 data: bytes, head_only: bool,
                 on_response: Callable[[UpstreamResponse], object],
                 on_failure: Callable[[Failure], object]) -> None:
        self.pool = pool
        self.key = key
        self.endpoint = endpoint
        self.data = data
        self.head_only = head_only
        self.on_response = on_response
        self.on_failure = on_failure
        self.egress: str | None = None
        self.address: str | None = None
        self.settled = False
        self.connecting: Deferred[Any] | None = None
        self.conn: _Connection | None = None
        self.retried = False

    def succeed(self, response: UpstreamResponse) -> None:
        if not self.settled:
            self.settled = True
            self.on_response(response)

    def fail(self, failure: Failure) -> None:
        if not self.settled:
            self.settled = True
            self.on_failure(failure)

    def start(self, fresh: bool = False) -> None:
        pool = self.pool
        if not fresh:
            conn = pool._take(self.key)
            if conn is not None:
                if conn.spare:
                    conn.spare = False
                    pool._demand(self.key, self.endpoint, missed=False)
                conn.send(self)
                return
            pool._demand(self.key, self.endpoint, missed=True)
        connecting = self.endpoint.connect(pool._factory(self.key))
        self.connecting = connecting
        connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, conn: _Connection) -> None:
        self.connecting = None
        if self.settled:  # cancelled meanwhile
            conn.transport.loseConnection()
            return
        conn.send(self)

    def _failed(self, failure: Failure) -> None:
        self.connecting = None
        self.fail(failure)

    def stale(self) -> None:
        """The reused connection closed before answering: try a fresh one once."""
        self.retried = True
        self.conn = None
        self.start(fresh=True)

    def cancel(self) -> None:
        """Stop: close the connection (or stop connecting); fail if not ended."""
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        elif self.conn is not None:
            conn, self.conn = self.conn, None
            conn.abandon()
        self.fail(Failure(CancelledError()))


class _ConnectionFactory(Factory):
    """Builds one destination's connections; keeps its demand state.

    Attributes:
        last_miss: When a request last found no idle connection.
        spare: The spare connection being opened, if one is.
    """

    noisy = False

    def __init__(self, pool: ConnectionPool, key: Hashable) -> None:
        self.pool = pool
        self.key = key
        self.last_miss = float("-inf")
        self.spare: Deferred[Any] | None = None

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.pool, self.key)


class ConnectionPool:
    """Persistent upstream connections, kept per destination key.

    Attributes:
        max_idle: Idle connections kept per key.
        idle_timeout: Seconds an idle connection is kept.
        spare_window: Two requests finding no idle connection this many
            seconds apart open a spare (0: never).
    """

    #: Destination keys remembered (factories); the oldest go first.
    MAX_KEYS = 4096

    def __init__(self, reactor: Any, max_idle: int, idle_timeout: float,
                 spare_window: float = SPARE_WINDOW) -> None:
        self.reactor = reactor
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.spare_window = spare_window
        self._idle: dict[Hashable, list[_Connection]] = {}
        self._factories: dict[Hashable, _ConnectionFactory] = {}
        self._closed = False
        # One timer closes connections idle too long (not one per connection).
        self._sweeper: Any = None

    def request(
        self, key: Hashable, endpoint: IStreamClientEndpoint, data: bytes, head_only: bool = False,
        egress: str | None = None, address: str | None = None,
    ) -> Deferred[UpstreamResponse]:
        """Send ``data`` (a whole request) on a connection for ``key``.

        Args:
            key: What connections may be shared between (one destination,
                one way of reaching it).
            endpoint: Opens a new connection when no idle one is left.
            data: The request head and body.
            head_only: The request is HEAD: its response has no body.
            egress: Put in the response's ``egress``.
            address: The response's ``address`` when the connection's peer
                is unknown.

        Returns:
            Fires with the response once its head arrived. A pooled
            connection that turns out closed is replaced once, quietly.
            Cancelling closes the connection (or stops connecting).
        """
        d: Deferred[UpstreamResponse] = Deferred(lambda _: attempt.cancel())
        attempt = self.send(key, endpoint, data, head_only, egress, address,
                            d.callback, d.errback)
        return d

    def send(
        self, key: Hashable, endpoint: IStreamClientEndpoint, data: bytes, head_only: bool,
        egress: str | None, address: str | None,
        on_response: Callable[[UpstreamResponse], object],
        on_failure: Callable[[Failure], object],
    ) -> _Attempt:
        """:meth:`request` without a Deferred: the proxy's hot path.

        Args:
            key: As for :meth:`request`.
            endpoint: As for :meth:`request`.
            data: As for :meth:`request`.
            head_only: As for :meth:`request`.
            egress: As for :meth:`request`.
            address: As for :meth:`request`.
            on_response: Called with the response once its head arrived.
            on_failure: Called with the failure instead.

        Returns:
            The attempt; its ``cancel()`` stops it (``on_failure`` then gets
            a CancelledError, unless it ended already).
        """
        attempt = _Attempt(self, key, endpoint, data, head_only, on_response, on_failure)
        attempt.egress, attempt.address = egress, address
        attempt.start()
        return attempt

    def _factory(self, key: Hashable) -> _ConnectionFactory:
        factory = self._factories.get(key)
        if factory is None:
            if len(self._factories) >= self.MAX_KEYS:
                oldest = self._factories.pop(next(iter(self._factories)))
                if oldest.spare is not None:  # forgotten: stop its spare too
                    oldest.spare.cancel()
            factory = self._factories[key] = _ConnectionFactory(self, key)
        return factory

    def _demand(self, key: Hashable, endpoint: IStreamClientEndpoint, missed: bool) -> None:
        """A request found no idle connection (``missed``) or took a spare:
        open a spare if demand is growing and none is idle or being opened."""
        factory = self._factory(key)
        if missed:
            now = self.reactor.seconds()
            growing = now - factory.last_miss < self.spare_window
            factory.last_miss = now
            if not growing:
                return
        if factory.spare is not None or self._closed or self._idle.get(key):
            return
        opening = endpoint.connect(factory)
        factory.spare = opening
        opening.addCallbacks(self._spare_open, self._spare_failed,
                             callbackArgs=(factory,), errbackArgs=(factory,))

    def _spare_open(self, conn: _Connection, factory: _ConnectionFactory) -> None:
        factory.spare = None
        conn.spare = True
        self._release(conn)  # idle now (or closed: pool full or closing)

    def _spare_failed(self, failure: Failure, factory: _ConnectionFactory) -> None:
        # Nobody waits for a spare: a request that finds no idle connection
        # opens its own and sees that error, if it persists.
        factory.spare = None

    def _take(self, key: Hashable) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = self.reactor.seconds() - self.idle_timeout
        while idle:
            conn = idle.pop()  # the most recently used first
            if conn.state == _IDLE and conn.idle_since > oldest:
                if not idle:
                    del self._idle[key]
                conn.reused = True
                return conn
            conn.state = _DEAD
            conn.transport.loseConnection()
        del self._idle[key]
        return None

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= self.max_idle:
            if not idle:
                del self._idle[conn.key]
            conn.state = _DEAD
            conn.transport.loseConnection()
            return
        idle.append(conn)
        conn.idle_since = self.reactor.seconds()
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_timeout``; come back later."""
        self._sweeper = None
        now = self.reactor.seconds()
        oldest = now - self.idle_timeout
        first = None
        for key, idle in list(self._idle.items()):
            for conn in [c for c in idle if c.idle_since <= oldest]:
                idle.remove(conn)
                conn.state = _DEAD
                conn.transport.loseConnection()
            if not idle:
                del self._idle[key]
            elif first is None or idle[0].idle_since < first:
                first = idle[0].idle_since
        if first is not None and not self._closed:
            self._sweeper = self.reactor.callLater(
                max(first - oldest, 0.001), self._sweep
            )

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    def idle_count(self) -> int:
        """Idle connections held now."""
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> Deferred[Any]:
        """Close the idle connections; later finishers close too.

        Returns:
            Fires when the idle connections are closed.
        """
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for factory in list(self._factories.values()):
            if factory.spare is not None:
                factory.spare.cancel()
        waiting = []
        for idle in list(self._idle.values()):
            for conn in list(idle):
                d: Deferred[None] = Deferred()
                conn.lost.append(d)
                waiting.append(d)
                conn.state = _DEAD
                conn.transport.loseConnection()
        return DeferredList(waiting)

