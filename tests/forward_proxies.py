"""Forward proxies on loopback for tests: a real tinyproxy and a Twisted one.

:func:`start_tinyproxy` runs Debian's ``tinyproxy`` in the foreground with a
generated config (loopback only, CONNECT allowed to any port, optional basic
auth). :class:`MiniProxy` is an in-suite forward proxy that can also
misbehave on purpose (refuse, demand credentials, drop or hang tunnels) and
records what it received.

:class:`TunnelClient` / :func:`open_tunnel` are a raw client for both: send a
``CONNECT`` (or any request head), read the proxy's reply head, then use the
connection as a tunnel (``transport.startTLS`` works on it).

Everything listens on and connects to 127.0.0.1 (or ::1) only.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort, IProcessTransport
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure

from helpers import NeedleWaiter

__all__ = [
    "MODES",
    "MiniProxy",
    "Tinyproxy",
    "TunnelClient",
    "open_tunnel",
    "proxy_authorization",
    "start_tinyproxy",
]

#: Seconds any single wait here may take.
WAIT = 10.0

#: The line tinyproxy logs once it accepts connections.
_TINYPROXY_READY = b"Accepting connections."

#: tinyproxy's exit status when it cannot bind its port (EX_OSERR).
_EX_OSERR = 71

#: The misbehaviours :class:`MiniProxy` knows.
MODES = ("ok", "refuse", "auth", "drop", "hang")

#: Request targets MiniProxy will connect to, and the address each means.
_LOOPBACK = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1"}

#: Longest request head MiniProxy accepts.
_MAX_HEAD = 64 * 1024

#: Headers MiniProxy drops when it forwards an absolute-form request.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authorization", b"proxy-connection"}

_TOKEN = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=-]+")


def proxy_authorization(user: str, password: str) -> str:
    """The ``Proxy-Authorization`` value for basic auth.

    Args:
        user: The user name.
        password: The password.

    Returns:
        ``"Basic " + base64("user:password")``.
    """
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _free_port() -> int:
    """A loopback TCP port that was free a moment ago (tinyproxy has no port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bounded(d: Deferred, reactor: Any, seconds: float = WAIT) -> Deferred:
    return d.addTimeout(seconds, reactor)


# --------------------------------------------------------------------------
# tinyproxy


class _TinyproxyProcess(ProcessProtocol):
    """Collects tinyproxy's log (stdout and stderr) and tracks its life."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.end_reason: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.ready.called and _TINYPROXY_READY in self.output:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.end_reason = reason
        if not self.ready.called:
            self.ready.errback(reason)
        self.ended.callback(None)


@attrs.define(eq=False)
class Tinyproxy:
    """A running tinyproxy on 127.0.0.1.

    Attributes:
        port: The port it listens on.
        url: ``http://127.0.0.1:PORT``, with ``user:password@`` when it
            requires basic auth.
        bare_url: ``http://127.0.0.1:PORT`` without credentials.
        basic_auth: The ``(user, password)`` it requires, if any.
        config_path: The generated config file.
    """

    port: int
    url: str
    bare_url: str
    basic_auth: tuple[str, str] | None
    config_path: Path
    _reactor: Any = attrs.field(repr=False)
    _process: IProcessTransport = attrs.field(repr=False)
    _protocol: _TinyproxyProcess = attrs.field(repr=False)
    _log_path: Path = attrs.field(repr=False)

    def log_text(self) -> str:
        """Everything tinyproxy logged so far (it logs to stdout)."""
        return self._protocol.output.decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        """Whether the process is still alive."""
        return not self._protocol.ended.called

    async def stop(self) -> None:
        """SIGTERM tinyproxy and wait (bounded) for it to end.

        Falls back to SIGKILL if SIGTERM is not enough. The log is saved
        next to the config file for post-mortems.
        """
        try:
            if self.running:
                self._process.signalProcess("TERM")
                try:
                    await _bounded(self._protocol.ended, self._reactor, 5.0)
                except DeferredTimeoutError:
                    if self.running:
                        self._process.signalProcess("KILL")
                        await _bounded(self._protocol.ended, self._reactor)
        finally:
            self._log_path.write_bytes(bytes(self._protocol.output))


def _tinyproxy_config(port: int, basic_auth: tuple[str, str] | None) -> str:
    lines = [
        "# Generated by tests/forward_proxies.py",
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 60",
        # No LogFile: tinyproxy then logs to stdout, which we capture. (A
        # LogFile under pytest's 0700 tmp dir is unwritable once tinyproxy
        # has dropped root.)
        "LogLevel Info",
        "MaxClients 100",
        "Allow 127.0.0.1",
        "Allow ::1",
        # No ConnectPort lines: CONNECT is allowed to every port.
    ]
    if os.geteuid() == 0:
        # As root, tinyproxy drops to this user after binding its port.
        nobody = pwd.getpwnam("nobody")
        lines += [f"User {nobody.pw_uid}", f"Group {nobody.pw_gid}"]
    if basic_auth is not None:
        lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
    return "\n".join(lines) + "\n"


async def start_tinyproxy(
    reactor: Any,
    tmp_path: Path,
    *,
    basic_auth: tuple[str, str] | None = None,
    attempts: int = 5,
) -> Tinyproxy:
    """Start tinyproxy on a free 127.0.0.1 port and wait until it is ready.

    Readiness is tinyproxy's own "Accepting connections." log line. If the
    port was taken in the meantime (tinyproxy has no port 0), it retries on
    another one, up to ``attempts`` times.

    Quirks of tinyproxy 1.11 worth knowing in tests: it answers missing
    credentials with ``407`` + ``Proxy-Authenticate`` but *wrong* ones with
    ``401`` + ``WWW-Authenticate``; its replies are ``HTTP/1.0``; it adds a
    ``Via: 1.1 tinyproxy (tinyproxy/1.11.1)`` header to forwarded requests.

    Args:
        reactor: The reactor to spawn on.
        tmp_path: Where to write the config and, after :meth:`Tinyproxy.stop`,
            the log.
        basic_auth: ``(user, password)`` to require, if any. Both must be
            plain tokens (no spaces or ``:``/``@``/``/``).
        attempts: How many ports to try.

    Returns:
        The running proxy; call :meth:`Tinyproxy.stop` when done.

    Raises:
        ValueError: The credentials are not plain tokens.
        RuntimeError: tinyproxy did not start.
    """
    exe = shutil.which("tinyproxy") or next(
        (p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if os.access(p, os.X_OK)),
        None,
    )
    if exe is None:
        pytest.fail("tinyproxy is not installed: run `apt-get install tinyproxy`", pytrace=False)
    if basic_auth is not None and not all(
        _TOKEN.fullmatch(part) and ":" not in part and "@" not in part for part in basic_auth
    ):
        raise ValueError(f"unsupported tinyproxy credentials: {basic_auth!r}")

    tmp_path = Path(tmp_path)
    failures: list[str] = []
    for _ in range(attempts):
        port = _free_port()
        config_path = tmp_path / f"tinyproxy-{port}.conf"
        config_path.write_text(_tinyproxy_config(port, basic_auth))
        protocol = _TinyproxyProcess()
        process = reactor.spawnProcess(
            protocol,
            exe,
            [exe, "-d", "-c", str(config_path)],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        try:
            await _bounded(protocol.ready, reactor)
        except (DeferredTimeoutError, ProcessDone, ProcessTerminated) as e:
            if not protocol.ended.called:
                process.signalProcess("KILL")
                await _bounded(protocol.ended, reactor)
            output = protocol.output.decode("utf-8", "replace")
            failures.append(f"port {port}: {e!r}\n{output}")
            exit_code = getattr(getattr(protocol.end_reason, "value", None), "exitCode", None)
            if exit_code == _EX_OSERR and b"listening" in protocol.output:
                continue  # the port was taken meanwhile: try another
            break
        bare_url = f"http://127.0.0.1:{port}"
        url = bare_url
        if basic_auth is not None:
            url = f"http://{basic_auth[0]}:{basic_auth[1]}@127.0.0.1:{port}"
        return Tinyproxy(
            port=port,
            url=url,
            bare_url=bare_url,
            basic_auth=basic_auth,
            config_path=config_path,
            reactor=reactor,
            process=process,
            protocol=protocol,
            log_path=tmp_path / f"tinyproxy-{port}.log",
        )
    raise RuntimeError("tinyproxy did not start:\n" + "\n".join(failures))


# --------------------------------------------------------------------------
# A raw client for forward proxies


class TunnelClient(Protocol, NeedleWaiter):
    """A raw client: reads a proxy's reply head, then the tunnel's bytes.

    Attributes:
        head: Fires with the reply head (status line and headers, without
            the blank line); errbacks if the connection ends first.
        reply_head: The reply head, once ``head`` fired.
        status: The reply's status code, once ``head`` fired.
        received: Bytes received after the reply head (decrypted, after
            ``transport.startTLS``).
        closed: Fires (with None) when the connection ends.
        reason: Why it ended, once it has.
    """

    def __init__(self) -> None:
        NeedleWaiter.__init__(self)
        self._buffer = bytearray()
        self.head: Deferred[bytes] = Deferred()
        self.reply_head: bytes | None = None
        self.status: int | None = None
        self.closed: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.head.called:
            self.feed(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 4 :])
        self._buffer.clear()
        try:
            self.status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.status = None
        self.reply_head = head
        self.head.callback(head)
        if rest:
            self.feed(rest)

    def wait_for(self, needle: bytes) -> Deferred[None]:
        """Fire when ``needle`` has been received after the head.

        Errbacks with the connection's end reason if it ends first.
        """
        if self.closed.called and needle not in self.received:
            return fail(self.reason)
        return NeedleWaiter.wait_for(self, needle)

    def connectionLost(self, reason: Failure = None) -> None:
        self.reason = reason
        if not self.head.called:
            self.head.errback(reason)
        self.fail_waits(reason)
        self.closed.callback(None)


async def open_tunnel(
    reactor: Any,
    proxy_port: int,
    target: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    request: bytes | None = None,
) -> TunnelClient:
    """Connect to a proxy on 127.0.0.1, send a request head, read the reply head.

    Args:
        reactor: The reactor.
        proxy_port: The proxy's port on 127.0.0.1.
        target: ``host:port`` to CONNECT to.
        headers: Extra request headers (e.g. ``Proxy-Authorization``).
        request: The raw bytes to send instead of the CONNECT head.

    Returns:
        The client, its reply head read (``status`` set); if the proxy said
        200 to a CONNECT, its transport is the tunnel.
    """
    client = TunnelClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port, timeout=5)
    await _bounded(connectProtocol(endpoint, client), reactor)
    if request is None:
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        lines += [f"{name}: {value}" for name, value in headers]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    client.transport.write(request)
    try:
        await _bounded(client.head, reactor)
    except BaseException:
        client.transport.abortConnection()
        raise
    return client


# --------------------------------------------------------------------------
# MiniProxy


def _reply(status: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\n" + extra
        + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )


_FORBIDDEN = _reply(b"403 Forbidden")
_BAD_REQUEST = _reply(b"400 Bad Request")
_BAD_GATEWAY = _reply(b"502 Bad Gateway")
_TOO_BIG = _reply(b"431 Request Header Fields Too Large")
_AUTH_REQUIRED = _reply(
    b"407 Proxy Authentication Required", b'Proxy-Authenticate: Basic realm="test"\r\n'
)
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def _split_host_port(authority: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` into its parts, or None if malformed."""
    if authority.startswith("["):
        host, sep, port = authority[1:].partition("]:")
    else:
        host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


class _Upstream(Protocol):
    """The origin side of a relay: what the origin sends goes to the client."""

    def __init__(self, peer: _ProxyConnection, first: bytes) -> None:
        self.peer = peer
        self.first = first
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.peer.transport.loseConnection()
        self.lost.callback(None)


class _ProxyConnection(Protocol):
    """One client connection to a :class:`MiniProxy`."""

    def __init__(self, proxy: MiniProxy) -> None:
        self.proxy = proxy
        self.buffer = bytearray()
        self.state = "head"  # head, connecting, relay, drop, hang, closed
        self.connecting: Deferred[Any] | None = None
        self.upstream: _Upstream | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.proxy._connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "relay":
            self.upstream.transport.write(data)
        elif self.state in ("head", "connecting"):
            self.buffer += data
            if self.state == "head":
                self._parse_head()
        elif self.state == "drop":
            self.state = "closed"
            self.transport.loseConnection()
        # hang and closed: ignore

    def _fail(self, reply: bytes) -> None:
        self.state = "closed"
        self.transport.write(reply)
        self.transport.loseConnection()

    def _parse_head(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_HEAD:
                self._fail(_TOO_BIG)
            return
        head = bytes(self.buffer[:end])
        rest = bytes(self.buffer[end + 4 :])
        self.buffer.clear()
        self.proxy.requests.append(head)
        try:
            self._dispatch(head, rest)
        finally:
            self.proxy._handled()

    def _dispatch(self, head: bytes, rest: bytes) -> None:
        request_line, *header_lines = head.split(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3:
            self._fail(_BAD_REQUEST)
            return
        method, target, version = parts
        headers: list[tuple[bytes, bytes]] = []
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep:
                self._fail(_BAD_REQUEST)
                return
            headers.append((name.strip().lower(), value.strip()))
        self._handle(method, target.decode("latin-1"), version, headers, rest)

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        user, password = self.proxy.credentials or ("", "")
        expected = proxy_authorization(user, password).encode()
        return any(
            name == b"proxy-authorization" and value == expected for name, value in headers
        )

    def _handle(
        self,
        method: bytes,
        target: str,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        rest: bytes,
    ) -> None:
        mode = self.proxy.mode
        is_connect = method == b"CONNECT"
        if is_connect:
            self.proxy.connects.append(target)
        if mode == "hang":
            self.state = "hang"
            return
        if mode == "refuse":
            self._fail(_FORBIDDEN)
            return
        if mode == "auth" and not self._authorized(headers):
            self._fail(_AUTH_REQUIRED)
            return
        if mode == "drop":
            if not is_connect:
                self.state = "closed"
                self.transport.loseConnection()
                return
            self.state = "drop"
            self.transport.write(_ESTABLISHED)
            if rest:
                self.dataReceived(rest)
            return
        # "ok", or "auth" with the right credentials.
        if is_connect:
            address = _split_host_port(target)
            first = rest
        else:
            address, first = self._origin_request(method, target, version, headers, rest)
        if address is None:
            self._fail(_BAD_REQUEST)
            return
        host, port = address
        ip = _LOOPBACK.get(host.lower())
        if ip is None:
            self._fail(_FORBIDDEN)
            return
        self._connect(ip, port, first, is_connect)

    def _origin_request(
        self,
        method: bytes,
        target: str,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        rest: bytes,
    ) -> tuple[tuple[str, int] | None, bytes]:
        """Rewrite an absolute-form request for its origin (one per connection)."""
        url = urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            return None, b""
        try:
            port = url.port or 80
        except ValueError:
            return None, b""
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        lines = [method + b" " + path.encode("latin-1") + b" " + version]
        lines += [
            name + b": " + value for name, value in headers if name not in _HOP_BY_HOP
        ]
        lines.append(b"connection: close")
        return (url.hostname, port), b"\r\n".join(lines) + b"\r\n\r\n" + rest

    def _connect(self, ip: str, port: int, first: bytes, is_connect: bool) -> None:
        reactor = self.proxy.reactor
        self.state = "connecting"
        self.transport.pauseProducing()
        if ":" in ip:
            endpoint: Any = TCP6ClientEndpoint(reactor, ip, port, timeout=5)
        else:
            endpoint = TCP4ClientEndpoint(reactor, ip, port, timeout=5)
        upstream = _Upstream(self, first)
        self.connecting = connectProtocol(endpoint, upstream)

        def connected(_: Any) -> None:
            self.connecting = None
            self.proxy._upstreams.add(upstream)
            upstream.lost.addBoth(lambda _: self.proxy._upstreams.discard(upstream))
            if self.state == "closed":
                upstream.transport.loseConnection()
                return
            self.upstream = upstream
            self.state = "relay"
            if is_connect:
                self.transport.write(_ESTABLISHED)
            pending = upstream.first + bytes(self.buffer)
            self.buffer.clear()
            if pending:
                upstream.transport.write(pending)
            # Backpressure both ways, as in twisted.protocols.portforward.
            self.transport.registerProducer(upstream.transport, True)
            upstream.transport.registerProducer(self.transport, True)
            self.transport.resumeProducing()

        def failed(reason: Failure) -> None:
            self.connecting = None
            if self.state != "closed":
                self._fail(_BAD_GATEWAY)

        self.connecting.addCallbacks(connected, failed)

    def connectionLost(self, reason: Failure = None) -> None:
        self.state = "closed"
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.transport.loseConnection()
        self.proxy._connections.discard(self)
        self.lost.callback(None)


@attrs.define(eq=False)
class MiniProxy(Factory):
    """A small forward proxy on 127.0.0.1 that can misbehave on purpose.

    Modes:
        ``ok``: ``CONNECT host:port`` opens a TCP connection (only to
        127.0.0.1, localhost or ::1; anything else gets 403) and relays bytes
        both ways with backpressure. An absolute-form ``GET http://...``
        goes to its (loopback) origin with the request line in origin-form,
        the hop-by-hop and proxy headers dropped and ``Connection: close``:
        one request per client connection.
        ``refuse``: every request gets ``403 Forbidden`` and a close.
        ``auth``: like ``ok``, but without the right ``Proxy-Authorization``
        the reply is ``407`` with ``Proxy-Authenticate: Basic realm="test"``.
        ``drop``: CONNECT gets ``200 Connection established``, then the
        connection closes when the first tunnelled bytes arrive (other
        requests are closed unanswered).
        ``hang``: reads the request and never answers.

    Attributes:
        reactor: The reactor it runs on.
        mode: One of :data:`MODES`.
        credentials: ``(user, password)`` that ``auth`` mode requires.
        requests: Each request head received (request line and headers,
            CRLF-separated, without the blank line).
        connects: The ``host:port`` target of each CONNECT.
        port: The port it listens on, once started.
        url: ``http://127.0.0.1:PORT``, with ``user:password@`` when it has
            credentials.
        bare_url: ``http://127.0.0.1:PORT``.
    """

    noisy = False

    reactor: Any
    mode: str = "ok"
    credentials: tuple[str, str] | None = None
    requests: list[bytes] = attrs.field(factory=list)
    connects: list[str] = attrs.field(factory=list)
    _listening: IListeningPort | None = attrs.field(default=None, repr=False)
    _port: int | None = attrs.field(default=None, repr=False)
    _connections: set[_ProxyConnection] = attrs.field(factory=set, repr=False)
    _upstreams: set[_Upstream] = attrs.field(factory=set, repr=False)
    _handled_count: int = attrs.field(default=0, repr=False)
    _request_waits: list[tuple[int, Deferred[None]]] = attrs.field(factory=list, repr=False)

    @classmethod
    async def start(
        cls,
        reactor: Any,
        *,
        mode: str = "ok",
        credentials: tuple[str, str] | None = None,
    ) -> MiniProxy:
        """Listen on 127.0.0.1, port 0.

        Args:
            reactor: The reactor.
            mode: One of :data:`MODES`.
            credentials: ``(user, password)``; required for ``auth`` mode.

        Returns:
            The listening proxy; call :meth:`stop` when done.

        Raises:
            ValueError: Unknown mode, or ``auth`` without credentials.
        """
        if mode not in MODES:
            raise ValueError(f"unknown MiniProxy mode {mode!r}; pick one of {MODES}")
        if mode == "auth" and credentials is None:
            raise ValueError("auth mode needs credentials")
        proxy = cls(reactor=reactor, mode=mode, credentials=credentials)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        proxy._listening = await _bounded(endpoint.listen(proxy), reactor)
        proxy._port = proxy._listening.getHost().port
        return proxy

    def wait_for_requests(self, count: int) -> Deferred[None]:
        """Fire once ``count`` request heads have been received and handled.

        "Handled" means the mode's reaction (a reply, a close, an upstream
        connection attempt, or nothing for ``hang``) has been started.
        """
        d: Deferred[None] = Deferred()
        if self._handled_count >= count:
            d.callback(None)
        else:
            self._request_waits.append((count, d))
        return d

    def _handled(self) -> None:
        self._handled_count += 1
        ready = [d for count, d in self._request_waits if count <= self._handled_count]
        self._request_waits = [
            (count, d) for count, d in self._request_waits if count > self._handled_count
        ]
        for d in ready:
            d.callback(None)

    def buildProtocol(self, addr: Any) -> Protocol:
        """A protocol for one client connection."""
        return _ProxyConnection(self)

    @property
    def port(self) -> int:
        """The listening port (still known after :meth:`stop`)."""
        assert self._port is not None, "MiniProxy is not started"
        return self._port

    @property
    def bare_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The proxy URL, with credentials if it has any."""
        if self.credentials is None:
            return self.bare_url
        user, password = self.credentials
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop listening and abort every connection, waiting (bounded)."""
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            listening, self._listening = self._listening, None
            waits.append(_maybe_deferred(listening.stopListening()))
        for connection in list(self._connections):
            waits.append(connection.lost)
            connection.transport.abortConnection()
        for upstream in list(self._upstreams):
            waits.append(upstream.lost)
            upstream.transport.abortConnection()
        if waits:
            await _bounded(DeferredList(waits, consumeErrors=True), self.reactor)


def _maybe_deferred(result: Any) -> Deferred[Any]:
    if isinstance(result, Deferred):
        return result
    d: Deferred[Any] = Deferred()
    d.callback(result)
    return d

