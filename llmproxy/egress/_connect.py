"""An endpoint that reaches host:port through an HTTP CONNECT tunnel.

Twisted's ProxyAgent cannot CONNECT, so https upstreams behind the outbound
proxy go through :class:`ConnectTunnelEndpoint`: connect to the proxy, send
``CONNECT host:port``, wait (bounded) for a 2xx reply, then hand the raw
connection to the wrapped protocol (normally TLS to the upstream, from
``wrapClientTLS``).
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import unquote

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI
from zope.interface import implementer

__all__ = ["ConnectTunnelEndpoint", "ProxyURL", "TunnelError", "TunnelTimeout", "host_port"]

#: The largest CONNECT reply head we read before giving up on the proxy.
MAX_REPLY_HEAD = 16 * 1024


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets.

    Args:
        host: A name or IP literal (IPv6 without brackets).
        port: The port.

    Returns:
        The authority, as in a CONNECT target or a log line.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class ProxyURL:
    """The parsed ``proxy_url``: where the proxy is, and its credentials.

    Attributes:
        scheme: ``http`` or ``https``.
        host: The proxy's host (IPv6 without brackets).
        port: Its port.
        authorization: The ``Proxy-Authorization`` value, if the URL has
            credentials.
    """

    scheme: str
    host: str
    port: int
    authorization: bytes | None

    @property
    def name(self) -> str:
        """``host:port``, as messages and access records name the proxy."""
        return host_port(self.host, self.port)

    @classmethod
    def parse(cls, url: str) -> ProxyURL:
        """Parse a validated ``proxy_url`` (credentials may hold delimiters)."""
        scheme, _, rest = url.partition("://")
        userinfo, at, hostport = rest.rpartition("@")
        parsed = URI.fromBytes(f"{scheme}://{hostport.rstrip('/')}".encode())
        authorization = None
        if at:
            user, _, password = userinfo.partition(":")
            token = f"{unquote(user)}:{unquote(password)}".encode()
            authorization = b"Basic " + base64.b64encode(token)
        return cls(
            scheme=scheme.lower(),
            host=parsed.host.decode("ascii").strip("[]"),
            port=parsed.port,
            authorization=authorization,
        )


class TunnelError(ConnectError):
    """The outbound proxy did not open the tunnel.

    Attributes:
        status_line: The proxy's status line, if it sent one.
    """

    def __init__(self, message: str, status_line: str | None = None) -> None:
        super().__init__(string=message)
        self.message = message
        self.status_line = status_line

    def __str__(self) -> str:
        return self.message


class TunnelTimeout(TunnelError):
    """The proxy did not answer CONNECT in time."""


class _TunnelProtocol(Protocol):
    """Speaks CONNECT, then becomes a pass-through for the wrapped protocol."""

    def __init__(
        self,
        endpoint: ConnectTunnelEndpoint,
        factory: IProtocolFactory,
        ready: Deferred[IProtocol],
    ) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._ready = ready
        self._head = b""
        self._timer: Any = None
        self.wrapped: IProtocol | None = None

    def connectionMade(self) -> None:
        endpoint = self._endpoint
        self.transport.write(endpoint.request_bytes())
        self._timer = endpoint.reactor.callLater(endpoint.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(
            TunnelTimeout(
                f"proxy {self._endpoint.proxy_name} did not answer CONNECT "
                f"{self._endpoint.target} within {self._endpoint.timeout:g} s"
            )
        )

    def _fail(self, error: Exception) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._ready.called:
            self._ready.errback(Failure(error))
        self.transport.abortConnection()

    def cancel(self) -> None:
        """Give up on the tunnel (the caller cancelled)."""
        if self.wrapped is None:
            self._fail(CancelledError())

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_REPLY_HEAD:
                name = self._endpoint.proxy_name
                self._fail(TunnelError(f"proxy {name} sent an oversized CONNECT reply"))
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1").strip()
        parts = status_line.split(None, 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if not (parts and parts[0].startswith("HTTP/") and 200 <= code < 300):
            self._fail(
                TunnelError(
                    f"proxy {self._endpoint.proxy_name} refused CONNECT "
                    f"{self._endpoint.target}: {status_line[:200]}",
                    status_line,
                )
            )
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.wrapped = self._factory.buildProtocol(self.transport.getPeer())
        if self.wrapped is None:
            self._fail(TunnelError("the protocol factory refused the tunnel"))
            return
        self.wrapped.makeConnection(self.transport)
        self._ready.callback(self.wrapped)
        if rest:
            self.wrapped.dataReceived(rest)

    def connectionLost(self, reason: Failure = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        elif not self._ready.called:
            self._ready.errback(
                Failure(
                    TunnelError(
                        f"proxy {self._endpoint.proxy_name} closed the connection "
                        f"before answering CONNECT {self._endpoint.target}"
                    )
                )
            )


@implementer(IStreamClientEndpoint)
class ConnectTunnelEndpoint:
    """Connects to ``host:port`` through an HTTP proxy's CONNECT method.

    Attributes:
        reactor: For the reply timeout.
        proxy: The endpoint of the proxy itself (TCP, or TLS for an https
            proxy).
        proxy_name: ``host:port`` of the proxy, for messages.
        host: The destination host.
        port: The destination port.
        authorization: The ``Proxy-Authorization`` value, or None.
        timeout: Seconds to wait for the proxy's CONNECT reply.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        proxy: IStreamClientEndpoint,
        proxy_name: str,
        host: str,
        port: int,
        authorization: bytes | None,
        timeout: float,
    ) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.proxy_name = proxy_name
        self.host = host
        self.port = port
        self.authorization = authorization
        self.timeout = timeout

    @property
    def target(self) -> str:
        """The CONNECT target, ``host:port`` (IPv6 bracketed)."""
        return host_port(self.host, self.port)

    def request_bytes(self) -> bytes:
        """The CONNECT request sent to the proxy."""
        target = self.target.encode("ascii")
        lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
        if self.authorization is not None:
            lines.append(b"Proxy-Authorization: " + self.authorization)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open the tunnel and connect ``protocolFactory``'s protocol over it.

        Args:
            protocolFactory: Builds the protocol that runs in the tunnel.

        Returns:
            Fires with that protocol once the proxy said 2xx; fails with
            :class:`TunnelError` (carrying the proxy's status line) or the
            error connecting to the proxy. Cancelling closes the connection.
        """
        def cancel(d: Deferred[IProtocol]) -> None:
            if protocol.transport is not None:
                protocol.cancel()
            else:
                connecting.cancel()

        ready: Deferred[IProtocol] = Deferred(cancel)
        protocol = _TunnelProtocol(self, protocolFactory, ready)
        connecting = connectProtocol(self.proxy, protocol)

        def failed(failure: Failure) -> None:
            if not ready.called:
                ready.errback(failure)

        connecting.addErrback(failed)
        return ready
