"""Tests for the test infrastructure: the throwaway PKI and the forward proxies.

A plain loopback origin and a TLS one (certificate for ``api.external.test``
and ``127.0.0.1`` from :mod:`certs`) sit behind tinyproxy and
:class:`forward_proxies.MiniProxy`; raw clients check what comes through.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from service_identity.exceptions import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import ProxyAgent, ResponseDone
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface.verify import verifyObject

from certs import CA, issue, make_ca, make_pki, server_context_factory, write_pem
from forward_proxies import (
    MiniProxy,
    TunnelClient,
    open_tunnel,
    proxy_authorization,
    start_tinyproxy,
)

#: Seconds any single wait may take.
WAIT = 10.0

TLS_NAME = "api.external.test"


class Hello(Resource):
    """Answers every request with ``hello <scheme> <path>`` and records it.

    Attributes:
        seen: ``(method, uri, headers)`` of each request, headers as a
            lower-cased dict of first values.
    """

    isLeaf = True

    def __init__(self, scheme: str) -> None:
        super().__init__()
        self.scheme = scheme
        self.seen: list[tuple[bytes, bytes, dict[bytes, bytes]]] = []

    def render(self, request: Request) -> bytes:
        """Record the request and answer it."""
        headers = {k.lower(): v[0] for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((request.method, request.uri, headers))
        request.setHeader(b"content-type", b"text/plain")
        return b"hello " + self.scheme.encode() + b" " + request.path


@attrs.frozen
class Origin:
    """A loopback origin server.

    Attributes:
        port: Its port on 127.0.0.1.
        resource: The resource answering its requests.
        ca: For a TLS origin, the CA that issued its certificate.
    """

    port: int
    resource: Hello
    ca: CA | None = None

    @property
    def authority(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"


@pytest_twisted.async_yield_fixture
async def origin(reactor: Any) -> AsyncIterator[Origin]:
    """A plain HTTP origin on 127.0.0.1."""
    resource = Hello("http")
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(Site(resource)).addTimeout(WAIT, reactor)
    try:
        yield Origin(port.getHost().port, resource)
    finally:
        await port.stopListening()


@pytest_twisted.async_yield_fixture
async def tls_origin(reactor: Any) -> AsyncIterator[Origin]:
    """An HTTPS origin on 127.0.0.1 for ``api.external.test`` and ``127.0.0.1``."""
    ca = make_ca()
    cert_pem, key_pem = issue(ca, [TLS_NAME, "127.0.0.1"])
    resource = Hello("https")
    endpoint = SSL4ServerEndpoint(
        reactor, 0, server_context_factory(cert_pem, key_pem), interface="127.0.0.1"
    )
    port = await endpoint.listen(Site(resource)).addTimeout(WAIT, reactor)
    try:
        yield Origin(port.getHost().port, resource, ca)
    finally:
        await port.stopListening()


def get_request(target: str, host: str, extra: str = "") -> bytes:
    """A ``GET`` head with ``Connection: close`` for ``target``."""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


async def https_over(reactor: Any, client: TunnelClient, origin: Origin, name: str) -> bytes:
    """Do TLS (verified against the origin's CA as ``name``) and a GET in a tunnel.

    Returns:
        Everything received until the origin closed the connection.
    """
    assert origin.ca is not None
    options = optionsForClientTLS(name, trustRoot=Certificate.loadPEM(origin.ca.cert_pem))
    client.transport.startTLS(options)
    client.transport.write(get_request("/secure", name))
    await client.closed.addTimeout(WAIT, reactor)
    return bytes(client.received)


async def plain_over(reactor: Any, client: TunnelClient, origin: Origin) -> bytes:
    """Do a plain GET in a tunnel; returns all bytes until the origin closes."""
    client.transport.write(get_request("/tunnelled", origin.authority))
    await client.closed.addTimeout(WAIT, reactor)
    return bytes(client.received)


async def read_reply(reactor: Any, client: TunnelClient) -> bytes:
    """Wait for the proxy to close; returns the reply head plus body."""
    await client.closed.addTimeout(WAIT, reactor)
    head = client.reply_head or b""
    return head + b"\r\n\r\n" + bytes(client.received)


class _Body(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: IResponse) -> Deferred[bytes]:
    """The whole body of an Agent response (errbacks on a truncated one)."""
    body = _Body()
    response.deliverBody(body)
    return body.done


def abort(*clients: TunnelClient | None) -> None:
    """Abort client connections that are still open."""
    for client in clients:
        if client is not None and not client.closed.called:
            client.transport.abortConnection()


# --------------------------------------------------------------------------
# certs


def test_issue_makes_a_server_certificate(tmp_path: Path) -> None:
    """issue() signs a leaf with DNS and IP SANs, serverAuth, not a CA."""
    ca = make_ca()
    cert_pem, key_pem = issue(ca, [TLS_NAME, "127.0.0.1", "::1"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [TLS_NAME]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ca_constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_constraints.value.ca is True
    assert cert.not_valid_before_utc < cert.not_valid_after_utc

    path = write_pem(tmp_path / "bundle.pem", cert_pem, key_pem)
    assert Path(path).read_bytes().count(b"-----BEGIN") == 2
    pki = make_pki(["a.test"])
    assert pki.names == ("a.test",) and pki.ca_cert_pem != pki.cert_pem
    assert verifyObject(IOpenSSLServerConnectionCreator, server_context_factory(cert_pem, key_pem))


# --------------------------------------------------------------------------
# tinyproxy


@pytest_twisted.ensureDeferred
async def test_tinyproxy_relays_absolute_form(
    reactor: Any, tmp_path: Path, origin: Origin
) -> None:
    """tinyproxy forwards a plain absolute-form GET, raw and from ProxyAgent."""
    proxy = await start_tinyproxy(reactor, tmp_path)
    client = None
    try:
        url = f"http://{origin.authority}/plain"
        client = await open_tunnel(
            reactor, proxy.port, "", request=get_request(url, origin.authority)
        )
        assert client.status == 200, client.reply_head
        reply = await read_reply(reactor, client)
        assert reply.endswith(b"hello http /plain")
        method, uri, headers = origin.resource.seen[-1]
        assert (method, uri) == (b"GET", b"/plain")
        assert b"tinyproxy" in headers.get(b"via", b"")

        agent = ProxyAgent(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), reactor)
        response = await agent.request(b"GET", f"{url}/agent".encode()).addTimeout(
            WAIT, reactor
        )
        body = await read_body(response).addTimeout(WAIT, reactor)
        assert (response.code, body) == (200, b"hello http /plain/agent")
    finally:
        abort(client)
        await proxy.stop()
    assert "Accepting connections" in proxy.log_text()
    assert (tmp_path / f"tinyproxy-{proxy.port}.log").exists()


@pytest_twisted.ensureDeferred
async def test_tinyproxy_connect_tunnel_carries_verified_tls(
    reactor: Any, tmp_path: Path, tls_origin: Origin
) -> None:
    """A CONNECT through tinyproxy carries TLS verified against the test CA."""
    proxy = await start_tinyproxy(reactor, tmp_path)
    clients: list[TunnelClient] = []
    try:
        for name in (TLS_NAME, "127.0.0.1"):
            client = await open_tunnel(reactor, proxy.port, tls_origin.authority)
            clients.append(client)
            assert client.status == 200, client.reply_head
            reply = await https_over(reactor, client, tls_origin, name)
            assert reply.startswith(b"HTTP/1.1 200 ")
            assert reply.endswith(b"hello https /secure")
        assert [seen[2][b"host"] for seen in tls_origin.resource.seen] == [
            TLS_NAME.encode(),
            b"127.0.0.1",
        ]
    finally:
        abort(*clients)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_tinyproxy_basic_auth(reactor: Any, tmp_path: Path, origin: Origin) -> None:
    """With BasicAuth, tinyproxy answers 407 without credentials, tunnels with them."""
    proxy = await start_tinyproxy(reactor, tmp_path, basic_auth=("alice", "s3cret"))
    assert proxy.url == f"http://alice:s3cret@127.0.0.1:{proxy.port}"
    denied = allowed = wrong = None
    try:
        denied = await open_tunnel(reactor, proxy.port, origin.authority)
        assert denied.status == 407, denied.reply_head
        assert b"proxy-authenticate: basic" in denied.reply_head.lower()

        wrong = await open_tunnel(
            reactor,
            proxy.port,
            origin.authority,
            headers=[("Proxy-Authorization", proxy_authorization("alice", "nope"))],
        )
        # tinyproxy 1.11 answers wrong credentials with 401 + WWW-Authenticate.
        assert wrong.status in (401, 407), wrong.reply_head

        allowed = await open_tunnel(
            reactor,
            proxy.port,
            origin.authority,
            headers=[("Proxy-Authorization", proxy_authorization("alice", "s3cret"))],
        )
        assert allowed.status == 200, allowed.reply_head
        reply = await plain_over(reactor, allowed, origin)
        assert reply.endswith(b"hello http /tunnelled")
    finally:
        abort(denied, wrong, allowed)
        await proxy.stop()


# --------------------------------------------------------------------------
# MiniProxy


@pytest_twisted.ensureDeferred
async def test_miniproxy_ok_tunnels_and_relays(
    reactor: Any, origin: Origin, tls_origin: Origin
) -> None:
    """"ok" mode: CONNECT tunnels (TLS verified), absolute-form relays, loopback only."""
    proxy = await MiniProxy.start(reactor)
    clients: list[TunnelClient] = []
    try:
        assert proxy.url == proxy.bare_url == f"http://127.0.0.1:{proxy.port}"
        tunnel = await open_tunnel(reactor, proxy.port, tls_origin.authority)
        clients.append(tunnel)
        assert tunnel.reply_head == b"HTTP/1.1 200 Connection established"
        reply = await https_over(reactor, tunnel, tls_origin, TLS_NAME)
        assert reply.endswith(b"hello https /secure")

        url = f"http://{origin.authority}/abs?q=1"
        plain = await open_tunnel(
            reactor,
            proxy.port,
            "",
            request=get_request(url, origin.authority, "Proxy-Connection: keep-alive\r\n"),
        )
        clients.append(plain)
        assert plain.status == 200
        reply = await read_reply(reactor, plain)
        assert reply.endswith(b"hello http /abs")
        _, uri, headers = origin.resource.seen[-1]
        assert uri == b"/abs?q=1" and b"proxy-connection" not in headers

        external = await open_tunnel(reactor, proxy.port, f"{TLS_NAME}:443")
        clients.append(external)
        assert external.status == 403

        wrong_name = await open_tunnel(reactor, proxy.port, tls_origin.authority)
        clients.append(wrong_name)
        assert await https_over(reactor, wrong_name, tls_origin, "other.test") == b""
        assert wrong_name.reason is not None
        assert wrong_name.reason.check(VerificationError), wrong_name.reason

        assert proxy.connects == [tls_origin.authority, f"{TLS_NAME}:443", tls_origin.authority]
        assert proxy.requests[1].startswith(f"GET {url} HTTP/1.1\r\n".encode())
    finally:
        abort(*clients)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_miniproxy_refuse(reactor: Any, origin: Origin) -> None:
    """"refuse" mode: CONNECT gets 403 and a close."""
    proxy = await MiniProxy.start(reactor, mode="refuse")
    client = None
    try:
        client = await open_tunnel(reactor, proxy.port, origin.authority)
        assert client.reply_head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        await client.closed.addTimeout(WAIT, reactor)
        assert proxy.connects == [origin.authority]
        assert origin.resource.seen == []
    finally:
        abort(client)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_miniproxy_auth(reactor: Any, origin: Origin) -> None:
    """"auth" mode: 407 with a Basic challenge unless the credentials match."""
    proxy = await MiniProxy.start(reactor, mode="auth", credentials=("bob", "pw"))
    clients: list[TunnelClient] = []
    try:
        assert proxy.url == f"http://bob:pw@127.0.0.1:{proxy.port}"
        for headers in ([], [("Proxy-Authorization", proxy_authorization("bob", "bad"))]):
            denied = await open_tunnel(reactor, proxy.port, origin.authority, headers=headers)
            clients.append(denied)
            assert denied.status == 407
            assert b'\r\nProxy-Authenticate: Basic realm="test"' in denied.reply_head
            await denied.closed.addTimeout(WAIT, reactor)

        good = proxy_authorization("bob", "pw")
        allowed = await open_tunnel(
            reactor, proxy.port, origin.authority, headers=[("Proxy-Authorization", good)]
        )
        clients.append(allowed)
        assert allowed.status == 200
        reply = await plain_over(reactor, allowed, origin)
        assert reply.endswith(b"hello http /tunnelled")
        assert f"Proxy-Authorization: {good}".encode() in proxy.requests[-1]
        assert b"Proxy-Authorization" not in proxy.requests[0]
    finally:
        abort(*clients)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_miniproxy_drop(reactor: Any, tls_origin: Origin) -> None:
    """"drop" mode: 200 to the CONNECT, then a close at the first tunnelled bytes."""
    proxy = await MiniProxy.start(reactor, mode="drop")
    client = None
    try:
        client = await open_tunnel(reactor, proxy.port, tls_origin.authority)
        assert client.status == 200
        assert not client.closed.called
        assert await https_over(reactor, client, tls_origin, TLS_NAME) == b""
        assert client.reason is not None and not client.reason.check(VerificationError)
        connect = f"CONNECT {tls_origin.authority} HTTP/1.1\r\nHost: {tls_origin.authority}"
        assert proxy.requests == [connect.encode()]
        assert tls_origin.resource.seen == []
    finally:
        abort(client)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_miniproxy_hang(reactor: Any, origin: Origin) -> None:
    """"hang" mode: the CONNECT is read and never answered."""
    proxy = await MiniProxy.start(reactor, mode="hang")
    client = TunnelClient()
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port)
        await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
        client.transport.write(f"CONNECT {origin.authority} HTTP/1.1\r\n\r\n".encode())
        await proxy.wait_for_requests(1).addTimeout(WAIT, reactor)
        assert proxy.connects == [origin.authority]
        with pytest.raises(DeferredTimeoutError):
            await client.head.addTimeout(0.2, reactor)
        assert not client.closed.called
    finally:
        abort(client)
        await proxy.stop()
