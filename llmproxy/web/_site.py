"""The Site the daemon listens with: client connections and their limits.

:class:`LLMProxySite` is twisted.web's ``Site`` with the channel and request
of :mod:`llmproxy.web._channel` (what is refused before ``render``), and the
connection limits a gateway facing untrusted clients needs:

- ``max_connections_per_client``: a client address with that many open
  connections gets its oldest idle keep-alive connection closed to make
  room for a new one, or, with none idle, the new one closed at once.
- ``max_connections``: at the limit the oldest idle keep-alive connection
  is closed to make room; with none idle the listening ports stop accepting
  until one closes or becomes idle, and the connections the daemon has
  keep being served.

Refusals are counted (``llmproxy_connections_refused_total``,
``llmproxy_idle_connections_closed_total``) and logged at most once every
:data:`~llmproxy.web._connections.LOG_EVERY` seconds, never once per connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.web.resource import Resource
from twisted.web.server import Site

from llmproxy.config import Config
from llmproxy.net import NetworkSet, parse_ip
from llmproxy.web._channel import GuardedChannel, LimitedRequest, Refusal
from llmproxy.web._connections import (
    ConnectionTable,
    Throttled,
    default_max_connections,
    default_max_connections_per_client,
    is_proxy_protocol,
)
from llmproxy.web._root import RootResource

__all__ = [
    "LLMProxySite",
    "build_site",
    "default_max_connections",
    "default_max_connections_per_client",
]

log = Logger(namespace="llmproxy.web")

#: The ``Server`` header of the answers llmproxy writes itself: no version
#: to hand a scanner.
SERVER = b"llmproxy"

class LLMProxySite(Site):
    """The Site llmproxy listens with.

    No tracebacks, the body size limit, the request deadline and the
    connection limits. Listeners call :meth:`watch_port` with each port
    they open, so that the site can pause it at ``max_connections``.

    A connection counts against its client address: the TCP peer's, or,
    with ``proxy_protocol``, the address the PROXY header names, known at
    the connection's first request byte (until then it counts only towards
    ``max_connections``). Peers in ``trusted_proxies`` count against no
    client.

    Attributes:
        max_body_bytes: The largest request body accepted.
        request_read: Seconds a request may take to arrive whole (None: no
            limit).
        max_connections: Open client connections at most (None: derived
            from the open-file limit at the first connection).
        max_connections_per_client: Open connections per client address at
            most (None: derived from ``max_connections``).
        proxy_protocol: Whether the site listens behind a PROXY protocol
            wrapper (``haproxy:``), whose header names the client.
        trusted_proxies: Peers counted against no client (reverse proxies
            in front, speaking for many clients).
        connections: The open connections, per client, idle or not.
    """

    displayTracebacks = False
    requestFactory = LimitedRequest
    protocol = GuardedChannel
    max_body_bytes: int | None = None
    request_read: float | None = None
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    proxy_protocol = False
    trusted_proxies = NetworkSet(())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: ConnectionTable[GuardedChannel] = ConnectionTable()
        self._ports: list[Any] = []
        self._paused = False
        self._log_paused = Throttled(
            self.reactor, LogLevel.warn,
            "max_connections ({limit}) reached with no idle connection: not "
            "accepting new connections until some close ({count} times since "
            "the last such line)",
        )
        self._log_refused = Throttled(
            self.reactor, LogLevel.warn,
            "max_connections_per_client ({limit}) reached: closed {count} new "
            "connection(s) since the last such line, the latest from {client}",
        )
        self._log_closed_idle = Throttled(
            self.reactor, LogLevel.info,
            "closed {count} idle keep-alive connection(s) to make room for new "
            "ones since the last such line (the latest for {reason})",
        )

    @property
    def open_connections(self) -> int:
        """Client connections open now (those being closed to make room
        excluded)."""
        return self.connections.open

    def getResourceFor(self, request: Any) -> Any:
        """Find the request's resource, naming llmproxy (without a version)
        as the server instead of twisted.web's ``TwistedWeb/<version>``.

        ``Request.process`` sets its own ``Server`` header just before
        asking the site for the resource; an upstream's ``Server`` header
        still replaces this one on proxied responses.
        """
        request.setHeader(b"server", SERVER)
        return super().getResourceFor(request)

    def log(self, request: Any) -> None:
        """Nothing: each proxied request logs one access record of its own."""

    def watch_port(self, port: Any) -> None:
        """Pause and resume ``port``'s accepting with the connection count."""
        self._ports.append(port)

    def unwatch_port(self, port: Any) -> None:
        """Forget ``port`` (it stops listening)."""
        if port in self._ports:
            self._ports.remove(port)

    def client_of(self, address: IAddress) -> str | None:
        """The client address a connection from ``address`` counts against.

        Args:
            address: A peer address.

        Returns:
            The IP address in canonical form (IPv4-mapped IPv6 as IPv4);
            None for a peer in ``trusted_proxies`` or one without an IP
            address (a UNIX socket).
        """
        host = getattr(address, "host", None)
        if not isinstance(host, str):
            return None
        ip = parse_ip(host)
        if ip is None or (self.trusted_proxies and ip in self.trusted_proxies):
            return None
        return str(ip)

    def buildProtocol(self, addr: IAddress) -> Protocol:
        """A channel for a new connection, or a :class:`Refusal` closing it.

        Past ``max_connections_per_client`` (for that client) or
        ``max_connections``, the oldest idle keep-alive connection (of that
        client, or of anyone) is closed to make room; with none idle, the
        new connection is refused. A listening port accepts several
        connections in one go, so the last few of a burst may find the
        limit reached before the port is paused.

        A refused connection still gets a protocol (one that closes it),
        never None: a wrapping factory (TLS, the PROXY protocol) cannot
        wrap None.

        Args:
            addr: The peer's address (a balancer's, behind the PROXY
                protocol).

        Returns:
            The protocol for the connection.
        """
        client = None if self.proxy_protocol else self.client_of(addr)
        if client is not None and not self._room_for(client):
            return Refusal()
        if self.connections.open >= self._limit():
            oldest = self.connections.oldest_idle()
            if oldest is None:
                self._pause()
                self._count_refused("max_connections")
                return Refusal()
            self._close_idle(oldest, "max_connections")
        channel = super().buildProtocol(addr)
        channel.client = client
        return channel

    def client_known(self, channel: GuardedChannel) -> bool:
        """Count a PROXY protocol connection against the client its header
        names (the channel's peer by its first request byte).

        Args:
            channel: The connection.

        Returns:
            False when the client is at ``max_connections_per_client`` with
            no idle connection: the channel must close.
        """
        client = self.client_of(channel.transport.getPeer())
        if client is None or not channel.counted:
            return True
        if not self._room_for(client):
            return False
        channel.client = client
        self.connections.add_client(client)
        return True

    def connection_opened(self, channel: GuardedChannel) -> None:
        """A channel started; pause accepting at the limit with none idle.

        Args:
            channel: The new connection's channel.
        """
        channel.counted = True
        self.connections.opened(channel.client)
        metrics = self._metrics()
        if metrics is not None:
            metrics.client_connections.inc()
        self._update_accepting()

    def connection_idle(self, channel: GuardedChannel) -> None:
        """A channel waits for its next request: it may be closed for room.

        Args:
            channel: The channel, kept alive after a response.
        """
        if channel.counted:
            self.connections.became_idle(channel, channel.client)
            self._update_accepting()

    def connection_busy(self, channel: GuardedChannel) -> None:
        """An idle channel got the first byte of its next request.

        Args:
            channel: The channel, reading a request again.
        """
        if channel.counted:
            self.connections.became_busy(channel, channel.client)
            self._update_accepting()

    def connection_closed(self, channel: GuardedChannel) -> None:
        """A channel ended; accept again when there is room.

        Args:
            channel: The closed connection's channel.
        """
        if channel.counted:
            self._release(channel)
            self._update_accepting()

    def _limit(self) -> int:
        if self.max_connections is None:
            self.max_connections = default_max_connections()
        return self.max_connections

    def _per_client_limit(self) -> int:
        if self.max_connections_per_client is None:
            self.max_connections_per_client = default_max_connections_per_client(
                self._limit())
        return self.max_connections_per_client

    def _room_for(self, client: str) -> bool:
        """Whether ``client`` may open one more connection, closing its
        oldest idle one if that makes room."""
        limit = self._per_client_limit()
        if self.connections.count(client) < limit:
            return True
        oldest = self.connections.oldest_idle(client)
        if oldest is not None:
            self._close_idle(oldest, "per_client")
            return True
        self._count_refused("per_client")
        self._log_refused(limit=limit, client=client)
        return False

    def _release(self, channel: GuardedChannel) -> None:
        channel.counted = False
        self.connections.closed(channel, channel.client)
        metrics = self._metrics()
        if metrics is not None:
            metrics.client_connections.dec()

    def _close_idle(self, channel: GuardedChannel, reason: str) -> None:
        self._release(channel)
        channel.close_idle()
        metrics = self._metrics()
        if metrics is not None:
            metrics.idle_connections_closed.labels(reason).inc()
        self._log_closed_idle(reason=reason)

    def _count_refused(self, reason: str) -> None:
        metrics = self._metrics()
        if metrics is not None:
            metrics.connections_refused.labels(reason).inc()

    def _metrics(self) -> Any:
        return getattr(self.resource, "metrics", None)

    def _update_accepting(self) -> None:
        full = self.connections.open >= self._limit() and not self.connections.idle
        if full:
            self._pause()
        elif self._paused:
            self._paused = False
            for port in self._ports:
                port.startReading()

    def _pause(self) -> None:
        if self._paused:
            return
        self._paused = True
        for port in self._ports:
            port.stopReading()
        metrics = self._metrics()
        if metrics is not None:
            metrics.connection_limit_reached.inc()
        self._log_paused(limit=self._limit())


def build_site(config: Config, reactor: Any, resource: Resource) -> LLMProxySite:
    """Build a Site serving ``resource`` with the config's client limits.

    Args:
        config: The validated configuration.
        reactor: The reactor.
        resource: The root resource (:class:`~llmproxy.web.RootResource`,
            served on ``listen``), or the admin resource (on
            ``admin_listen``).

    Returns:
        The Site to listen with.
    """
    site = LLMProxySite(resource, reactor=reactor, timeout=config.timeouts.client_idle)
    site.max_body_bytes = config.max_body_bytes
    site.request_read = config.timeouts.request_read
    site.max_connections = config.max_connections
    site.max_connections_per_client = config.max_connections_per_client
    site.trusted_proxies = NetworkSet(config.trusted_proxies)
    listen = config.listen if isinstance(resource, RootResource) else config.admin_listen
    site.proxy_protocol = is_proxy_protocol(listen)
    return site
