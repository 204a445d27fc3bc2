"""The daemon's lighter accept loop (llmproxy._accept).

Each test listens on 127.0.0.1 port 0 with its own epoll reactor, stepped
by hand (never run), and connects plain sockets to it. The daemon itself
accepts this way in every twistd test (test_tap).
"""

from __future__ import annotations

import resource
import socket
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from llmproxy._accept import lighten_port
from helpers import step_until

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class _Echo(Protocol):
    """Answers each read with the peer's address and the bytes read."""

    def dataReceived(self, data: bytes) -> None:
        peer = self.transport.getPeer()
        self.transport.write(b"%s %d %s" % (peer.host.encode(), peer.port, data))


class _Counting(Factory):
    """Builds _Echo protocols; refuses connections while ``refuse`` is set."""

    protocol = _Echo

    def __init__(self) -> None:
        self.built: list[Any] = []
        self.refuse = False

    def buildProtocol(self, addr: Any) -> Any:
        if self.refuse:
            return None
        protocol = super().buildProtocol(addr)
        self.built.append((addr, protocol))
        return protocol


def _answer(reactor: Any, client: socket.socket) -> bytes:
    """What the server answers (stepping the loop until it does)."""
    client.setblocking(False)
    got: list[bytes] = []

    def answered() -> bool:
        try:
            got.append(client.recv(1000))
        except BlockingIOError:
            return False
        return True

    step_until(reactor, answered)
    client.setblocking(True)
    return got[0]


@pytest.fixture
def listening() -> Any:
    reactor = epollreactor.EPollReactor()
    factory = _Counting()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    assert lighten_port(port) is True
    clients: list[socket.socket] = []
    yield reactor, factory, port, clients
    for client in clients:
        client.close()
    for _, protocol in factory.built:
        if protocol.transport is not None and protocol.transport.connected:
            protocol.transport.abortConnection()
    port.stopListening()
    reactor.doIteration(0)


def _connect(port: Any, clients: list[socket.socket]) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    clients.append(client)
    return client


def test_a_burst_of_connections_is_accepted_and_each_served(listening: Any) -> None:
    """Connections waiting together are all accepted in one step, each with
    its own protocol and transport that know the peer's address."""
    reactor, factory, port, clients = listening
    for n in range(5):
        _connect(port, clients).sendall(b"hello %d" % n)
    reactor.doIteration(1.0)
    assert len(factory.built) == 5
    for n, client in enumerate(clients):
        host, client_port = client.getsockname()
        assert _answer(reactor, client) == b"%s %d hello %d" % (host.encode(), client_port, n)
    peers = {(addr.host, addr.port) for addr, _ in factory.built}
    assert peers == {client.getsockname() for client in clients}
    sessions = {protocol.transport.sessionno for _, protocol in factory.built}
    assert len(sessions) == 5
    # Each transport's socket is a standard one of the listener's kind,
    # non-blocking, and its own ends are the client's.
    for n, (_, protocol) in enumerate(factory.built):
        skt = protocol.transport.socket
        assert (skt.family, skt.type, skt.gettimeout()) == (socket.AF_INET, socket.SOCK_STREAM, 0.0)
    ends = {protocol.transport.socket.getpeername() for _, protocol in factory.built}
    assert ends == {client.getsockname() for client in clients}


def test_a_refused_connection_is_closed_and_the_next_served(listening: Any) -> None:
    """A factory that builds no protocol gets the connection closed; the port
    goes on accepting."""
    reactor, factory, port, clients = listening
    factory.refuse = True
    refused = _connect(port, clients)
    assert _answer(reactor, refused) == b""
    factory.refuse = False
    served = _connect(port, clients)
    served.sendall(b"now")
    assert _answer(reactor, served).endswith(b" now")


def test_out_of_descriptors_the_client_is_closed_and_the_port_goes_on(
    listening: Any,
) -> None:
    """With no file descriptor left, accepting fails with EMFILE: Twisted's
    handling (its reserved descriptor) closes the waiting client and logs
    it, the loop goes on, and once descriptors are free again the port
    serves."""
    reactor, factory, port, clients = listening
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    waiting = _connect(port, clients)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = socket.socket()
    lowest_free = probe.fileno()
    probe.close()
    try:
        # The next descriptor the process opens would be over the limit.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        reactor.doIteration(1.0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        globalLogPublisher.removeObserver(events.append)
    assert factory.built == []
    try:
        assert waiting.recv(10) == b""
    except ConnectionResetError:
        pass  # closed by the server: a reset is a close too
    assert any("EMFILE" in str(event.get("log_format", "")) for event in events)
    served = _connect(port, clients)
    served.sendall(b"again")
    assert _answer(reactor, served).endswith(b" again")


def test_only_a_plain_tcp_port_is_changed(tmp_path: Any) -> None:
    """A UNIX port (or anything not exactly tcp.Port) is left as it is."""
    reactor = epollreactor.EPollReactor()
    unix = reactor.listenUNIX(str(tmp_path / "s"), Factory.forProtocol(Protocol))
    try:
        kind = type(unix)
        assert lighten_port(unix) is False
        assert type(unix) is kind
    finally:
        unix.stopListening()
        reactor.doIteration(0)


def test_an_ipv6_peer_is_named_as_twisted_names_it() -> None:
    """On an IPv6 port the peer's address is the numeric host (Twisted's
    getnameinfo form) and its port."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    reactor = epollreactor.EPollReactor()
    factory = _Counting()
    try:
        port = reactor.listenTCP(0, factory, interface="::1")
    except Exception:  # noqa: BLE001 - no ::1 on this machine
        pytest.skip("cannot listen on ::1")
    assert lighten_port(port) is True
    client = socket.create_connection(("::1", port.getHost().port), timeout=5)
    try:
        client.sendall(b"six")
        host, client_port = client.getsockname()[:2]
        assert _answer(reactor, client) == b"::1 %d six" % client_port
        addr, protocol = factory.built[0]
        assert (addr.type, addr.host, addr.port) == ("TCP", "::1", client_port)
        assert protocol.transport.socket.family == socket.AF_INET6
        assert protocol.transport.getPeer().port == client_port
        protocol.transport.abortConnection()
    finally:
        client.close()
        port.stopListening()
        reactor.doIteration(0)


class _FailsOnce:
    """The port's real listening socket, whose next accept fails once with
    ``code`` (errors a test cannot make the kernel produce on demand)."""

    def __init__(self, real: socket.socket, code: int) -> None:
        self.real = real
        self.code = code
        self.failed = False

    def _accept(self) -> Any:
        # The system call the port's loop makes (socket.accept's own).
        if not self.failed:
            self.failed = True
            raise OSError(self.code, "injected")
        return self.real._accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.parametrize("code", ["ECONNABORTED", "ENOBUFS", "ENOMEM", "ENFILE"])
def test_an_accept_error_is_logged_as_twisted_logs_it(listening: Any, code: str) -> None:
    """A failed accept (a client that reset before it was accepted, memory
    short for a moment) is logged once, under tcp.Port's log namespace, as
    Twisted logs it; the waiting client is served on the next step."""
    import errno

    reactor, factory, port, clients = listening
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    real = port.socket
    port.socket = _FailsOnce(real, getattr(errno, code))
    try:
        waiting = _connect(port, clients)
        reactor.doIteration(1.0)
    finally:
        port.socket = real
        globalLogPublisher.removeObserver(events.append)
    logged = [e for e in events if "Could not accept" in str(e.get("log_format"))]
    assert len(logged) == 1 and logged[0]["acceptError"] == code
    assert logged[0]["log_namespace"] == "twisted.internet.tcp.Port"
    assert factory.built == []
    waiting.sendall(b"later")
    assert _answer(reactor, waiting).endswith(b" later")
