"""Egress: direct or through the outbound proxy, CONNECT tunnels and TLS.

Only loopback addresses are ever connected to. Names such as
``llm.internal.test`` resolve through a fake resolver to 127.0.0.1, and
``direct_networks`` decides which loopback addresses count as internal.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from zope.interface import implementer

from certs import issue, make_ca, server_context_factory, write_pem
from forward_proxies import MiniProxy, start_tinyproxy
from helpers import collect, fetch, send
from llmproxy.config import parse_config_text
from llmproxy.egress import ConnectionWatch, DirectEndpoints, Egress, NoProxy, TLSSetupError
from llmproxy.resolver import ResolvingReactor
from llmproxy.testing.resolver import FakeResolver
from llmproxy.testing.upstream import make_site

WAIT = 10.0
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


# -- the decision table, no network ----------------------------------------

HOSTS = {
    "llm.internal.test": ["127.0.0.2"],
    "api.external.test": ["127.0.0.3"],
    "dual.test": ["127.0.0.3", "127.0.0.2"],
    "v6.internal.test": ["::1"],
}


def decider(extra: str = "", proxy: bool = True) -> Egress:
    """An Egress on a memory reactor whose names resolve from HOSTS."""
    text = 'target_map: {"/": "http://127.0.0.1:1"}\n'
    if proxy:
        text += 'proxy_url: "http://127.0.0.1:3128"\n'
        text += "direct_networks: [127.0.0.2/32, '::1/128']\n"
    config = parse_config_text(text + extra, environ={})
    return Egress(config, ResolvingReactor(MemoryReactorClock(), FakeResolver(HOSTS)))


def decided(egress: Egress, host: str, via: str = "auto") -> str:
    """Run a decision to completion (the fake resolver answers at once)."""
    results: list[str] = []
    egress.decide(host, via).addCallback(results.append)
    assert results, "the decision did not complete synchronously"
    return results[0]


@pytest.mark.parametrize(
    "host, expected",
    [
        ("llm.internal.test", "direct"),
        ("api.external.test", "proxy"),
        ("dual.test", "direct"),  # any address inside direct_networks
        ("v6.internal.test", "direct"),
        ("does-not-resolve.test", "proxy"),  # the proxy may know it
        ("127.0.0.2", "direct"),
        ("127.0.0.9", "proxy"),
        ("[::1]", "direct"),
    ],
)
def test_decision_by_address(host: str, expected: str) -> None:
    """Names and IP literals inside direct_networks go direct, others via proxy."""
    assert decided(decider(), host) == expected


@pytest.mark.parametrize(
    "host, expected",
    [
        ("exact.test", "direct"),
        ("sub.exact.test", "proxy"),
        ("a.corp.test", "direct"),
        ("deep.a.corp.test", "direct"),
        ("corp.test", "direct"),
        ("notcorp.test", "proxy"),
        ("127.0.0.70", "direct"),
        ("127.0.0.200", "proxy"),
        ("EXACT.TEST", "direct"),
    ],
)
def test_decision_by_no_proxy(host: str, expected: str) -> None:
    """no_proxy: exact names, .suffix domains and CIDRs go direct."""
    egress = decider('no_proxy: ["exact.test", ".corp.test", "127.0.0.64/26"]\n')
    assert decided(egress, host) == expected


def test_no_proxy_star_and_comma_string() -> None:
    """'*' sends everything direct; a comma-separated string also works."""
    assert decided(decider('no_proxy: "*"\n'), "api.external.test") == "direct"
    egress = decider('no_proxy: "a.test, .b.test"\n')
    assert decided(egress, "x.b.test") == "direct"
    assert decided(egress, "api.external.test") == "proxy"


def test_no_proxy_matcher_ipv6() -> None:
    """CIDRs in no_proxy work for IPv6 literals, bracketed or not."""
    matcher = NoProxy(["fd00::/8", "::1"])
    assert matcher.matches("fd12::1")
    assert matcher.matches("[::1]")
    assert not matcher.matches("2001:db8::1")


@pytest.mark.parametrize(
    "host, via, expected",
    [
        ("llm.internal.test", "proxy", "proxy"),
        ("api.external.test", "direct", "direct"),
        ("api.external.test", "auto", "proxy"),
    ],
)
def test_via_overrides(host: str, via: str, expected: str) -> None:
    """A route's via: direct | proxy wins over the address rules."""
    assert decided(decider(), host, via) == expected


def test_no_proxy_url_means_direct() -> None:
    """Without proxy_url every upstream is reached directly."""
    egress = decider(proxy=False)
    for host in ("api.external.test", "does-not-resolve.test", "203.0.113.7"):
        assert decided(egress, host) == "direct"


def test_default_direct_networks() -> None:
    """The default direct_networks cover private, loopback and link-local."""
    text = 'target_map: {"/": "http://127.0.0.1:1"}\nproxy_url: "http://127.0.0.1:3128"\n'
    egress = Egress(
        parse_config_text(text, environ={}),
        ResolvingReactor(MemoryReactorClock(), FakeResolver()),
    )
    for ip in ("10.1.2.3", "172.20.0.1", "192.168.1.1", "127.0.0.1", "169.254.0.1",
               "100.64.0.1", "::1", "fd00::1", "fe80::1"):
        assert decided(egress, ip) == "direct", ip
    for ip in ("8.8.8.8", "172.32.0.1", "2001:db8::1"):
        assert decided(egress, ip) == "proxy", ip


def test_decision_uses_the_dns_cache() -> None:
    """Deciding twice within the TTL asks the resolver once."""
    resolver = FakeResolver(HOSTS)
    clock = MemoryReactorClock()
    config = parse_config_text(
        'target_map: {"/": "http://127.0.0.1:1"}\nproxy_url: "http://127.0.0.1:3128"\n',
        environ={},
    )
    egress = Egress(config, ResolvingReactor(clock, resolver))
    decided(egress, "api.external.test")
    decided(egress, "api.external.test")
    assert resolver.lookups.count("api.external.test") == 1
    clock.advance(301)
    decided(egress, "api.external.test")
    assert resolver.lookups.count("api.external.test") == 2


@pytest.mark.parametrize(
    "text, key",
    [
        ('via: sometimes', "target_map[\"/v1/\"].via"),
        ('via: proxy', "target_map[\"/v1/\"].via"),
    ],
)
def test_via_config_errors(text: str, key: str) -> None:
    """A bad via, or via: proxy without proxy_url, names the key."""
    from llmproxy.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse_config_text(
            f'target_map:\n  "/v1/": {{urls: ["http://a.test"], {text}}}\n', environ={}
        )
    assert raised.value.key == key


# -- over loopback -----------------------------------------------------------


@pytest.fixture
def events() -> Iterator[list[dict]]:
    """Log events emitted during the test."""
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def request_event(events: list[dict], rid: str) -> dict:
    """The per-request log event of request ``rid``."""
    matching = [e for e in events if e.get("request_id") == rid and "egress" in e]
    assert len(matching) == 1, matching
    return matching[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A throwaway CA, a server certificate, and a CA that did not sign it."""
    ca, other = make_ca(), make_ca("some other CA")
    cert, key = issue(ca, ["llm.internal.test", "api.external.test", "127.0.0.1"])
    folder = tmp_path_factory.mktemp("pki")
    return {
        "cert": cert,
        "key": key,
        "ca_file": write_pem(folder / "ca.pem", ca.cert_pem),
        "wrong_ca_file": write_pem(folder / "other.pem", other.cert_pem),
    }


@pytest_twisted.async_yield_fixture
async def tls_upstream(reactor: Any, pki: dict[str, Any]) -> Any:
    """The fake upstream serving HTTPS on 127.0.0.1."""
    from llmproxy.testing.upstream import FakeUpstream

    upstream = FakeUpstream(reactor)
    endpoint = SSL4ServerEndpoint(
        reactor, 0, server_context_factory(pki["cert"], pki["key"]), interface="127.0.0.1"
    )
    port = await endpoint.listen(make_site(reactor, upstream))
    yield upstream, port.getHost().port
    await port.stopListening()


@pytest_twisted.async_yield_fixture
async def tinyproxy(reactor: Any, tmp_path: Path) -> Any:
    """tinyproxy from Debian on a free loopback port."""
    proxy = await start_tinyproxy(reactor, tmp_path)
    yield proxy
    await proxy.stop()


@pytest_twisted.async_yield_fixture
async def mini_proxies(reactor: Any) -> Any:
    """A factory of misbehaving in-suite proxies, stopped after the test."""
    started: list[MiniProxy] = []

    async def start(**kw: Any) -> MiniProxy:
        proxy = await MiniProxy.start(reactor, **kw)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


def egress_config(target: str, proxy_url: str | None = None, extra: str = "") -> str:
    """A config routing /v1/ to ``target``; loopback counts as external."""
    text = f'target_map:\n  "/v1/": {target}\n'
    if proxy_url:
        text += f'proxy_url: "{proxy_url}"\ndirect_networks: ["10.0.0.0/8"]\n'
    return text + extra


@pytest_twisted.ensureDeferred
async def test_http_through_tinyproxy(reactor, upstreams, proxies, client, tinyproxy, events):
    """An external http upstream is reached through a real forward proxy."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(egress_config(f'"{base}"', tinyproxy.url))
    response, body = await fetch(
        client, reactor, proxy + "/v1/chat/completions", CHAT, headers={"X-Request-ID": "t1"}
    )
    assert response.code == 200
    assert json.loads(body)["object"] == "chat.completion"
    seen = upstream.requests[-1].headers
    assert seen.hasHeader(b"via"), "tinyproxy adds a Via header"
    event = request_event(events, "t1")
    assert event["egress"] == "proxy"
    assert event["address"] == f"127.0.0.1:{tinyproxy.port}"


@pytest_twisted.ensureDeferred
async def test_https_through_tinyproxy_connect(
    reactor, proxies, client, tinyproxy, tls_upstream, pki, events
):
    """An https upstream goes through a CONNECT tunnel, TLS verified inside."""
    upstream, port = tls_upstream
    proxy = await proxies.start(
        egress_config(f'"https://127.0.0.1:{port}"', tinyproxy.url,
                      f'tls: {{ca_file: "{pki["ca_file"]}"}}\n')
    )
    for rid in ("c1", "c2"):
        response, body = await fetch(
            client, reactor, proxy + "/v1/chat/completions", CHAT, headers={"X-Request-ID": rid}
        )
        assert response.code == 200, body
        assert request_event(events, rid)["egress"] == "proxy"
    assert not upstream.requests[-1].headers.hasHeader(b"via"), "tunnelled, not relayed"


@pytest_twisted.ensureDeferred
async def test_stream_through_tunnel_arrives_chunk_by_chunk(
    reactor, proxies, client, tinyproxy, tls_upstream, pki
):
    """SSE events cross the CONNECT tunnel while the upstream still sends."""
    upstream, port = tls_upstream
    proxy = await proxies.start(
        egress_config(f'"https://127.0.0.1:{port}"', tinyproxy.url,
                      f'tls: {{ca_file: "{pki["ca_file"]}"}}\n')
    )
    response = await send(
        client, reactor, proxy + "/v1/chat/completions", {**CHAT, "stream": True},
        headers={"X-Fake-Chunks": "4", "X-Fake-Chunk-Delay": "0.3"},
    )
    body = collect(response)
    first = await body.first.addTimeout(WAIT, reactor)
    assert first.startswith(b"data: ")
    assert not upstream.requests[-1].done.called
    assert (await body.done.addTimeout(WAIT, reactor)).rstrip().endswith(b"[DONE]")


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "tunnel"])
@pytest_twisted.ensureDeferred
async def test_tls_ca_file_right_and_wrong(
    reactor, proxies, client, mini_proxies, tls_upstream, pki, through_proxy
):
    """The right ca_file passes; a CA that did not sign the cert gives 502."""
    upstream, port = tls_upstream
    proxy_url = (await mini_proxies()).url if through_proxy else None
    host = "127.0.0.1" if through_proxy else "llm.internal.test"
    for ca_file, status in ((pki["ca_file"], 200), (pki["wrong_ca_file"], 502)):
        proxies.resolver.hosts["llm.internal.test"] = ["127.0.0.1"]
        proxy = await proxies.start(
            egress_config(f'"https://{host}:{port}"', proxy_url,
                          f'tls: {{ca_file: "{ca_file}"}}\n')
        )
        response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
        assert response.code == status, body
        if status == 502:
            error = json.loads(body)["error"]
            assert error["code"] == "upstream_tls_error"
            assert "certificate" in error["message"]


@pytest_twisted.ensureDeferred
async def test_system_trust_alone_refuses_a_private_ca(reactor, proxies, client, tls_upstream):
    """Without ca_file a private CA is not trusted: 502, never accepted."""
    upstream, port = tls_upstream
    proxies.resolver.hosts["llm.internal.test"] = ["127.0.0.1"]
    proxy = await proxies.start(egress_config(f'"https://llm.internal.test:{port}"'))
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 502
    assert json.loads(body)["error"]["code"] == "upstream_tls_error"
    assert not upstream.requests


@pytest_twisted.ensureDeferred
async def test_wrong_host_name_is_refused(reactor, proxies, client, tls_upstream, pki):
    """A certificate for other names fails hostname verification: 502."""
    upstream, port = tls_upstream
    proxies.resolver.hosts["other.internal.test"] = ["127.0.0.1"]
    proxy = await proxies.start(
        egress_config(f'"https://other.internal.test:{port}"', None,
                      f'tls: {{ca_file: "{pki["ca_file"]}"}}\n')
    )
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 502
    assert json.loads(body)["error"]["code"] == "upstream_tls_error"
    assert not upstream.requests


@pytest.mark.parametrize(
    "mode, status, code, fragment",
    [
        ("refuse", 502, "upstream_proxy_error", "403"),
        ("auth", 502, "upstream_proxy_error", "407"),
        ("drop", 502, "", ""),
        ("hang", 504, "upstream_proxy_timeout", "did not answer CONNECT"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_misbehaving_proxy(
    reactor, proxies, client, mini_proxies, tls_upstream, pki, mode, status, code, fragment
):
    """A proxy that refuses, wants auth, drops or hangs gives a clear error."""
    upstream, port = tls_upstream
    mini = await mini_proxies(mode=mode, credentials=("user", "pw"))
    proxy = await proxies.start(
        egress_config(f'"https://127.0.0.1:{port}"', f"http://127.0.0.1:{mini.port}",
                      f'tls: {{ca_file: "{pki["ca_file"]}"}}\ntimeouts: {{connect: 0.5}}\n')
    )
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == status, body
    error = json.loads(body)["error"]
    if code:
        assert error["code"] == code
    assert fragment in error["message"]
    assert not upstream.requests


@pytest_twisted.ensureDeferred
async def test_proxy_credentials(reactor, proxies, client, mini_proxies, upstreams, tls_upstream, pki):
    """proxy_url credentials become Proxy-Authorization, for CONNECT and http."""
    upstream, base = await upstreams.start()
    tls, port = tls_upstream
    mini = await mini_proxies(mode="auth", credentials=("user", "p@ss:w#rd"))
    proxy_url = f"http://user:p%40ss%3Aw%23rd@127.0.0.1:{mini.port}"
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": "https://127.0.0.1:{port}"\n  "/echo/": "{base}"\n'
        f'proxy_url: "{proxy_url}"\ndirect_networks: []\n'
        f'tls: {{ca_file: "{pki["ca_file"]}"}}\n'
    )
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200, body
    response, body = await fetch(
        client, reactor, proxy + "/echo/x", b"{}",
        headers={"Proxy-Authorization": "Basic client-secret"},
    )
    assert response.code == 200, body
    assert mini.requests[-1].startswith(f"POST {base}/echo/x HTTP/1.1".encode())
    assert b"client-secret" not in b"".join(mini.requests)
    seen = dict(json.loads(body)["headers"])
    assert "proxy-authorization" not in seen


@pytest_twisted.ensureDeferred
async def test_tunnels_pooled_per_upstream_and_never_mixed_with_direct(
    reactor, proxies, client, mini_proxies, tls_upstream, pki, events
):
    """Tunnels are reused per host:port; direct and tunnelled never share."""
    upstream, port = tls_upstream
    mini = await mini_proxies()
    proxies.resolver.hosts["llm.internal.test"] = ["127.0.0.1"]
    proxy = await proxies.start(
        f'target_map:\n'
        f'  "/v1/": {{urls: ["https://127.0.0.1:{port}"], via: proxy}}\n'
        f'model_routes:\n'
        f'  "direct-model": {{urls: ["https://127.0.0.1:{port}"], via: direct}}\n'
        f'proxy_url: "{mini.url}"\n'
        f'tls: {{ca_file: "{pki["ca_file"]}"}}\n'
    )
    order = ["m", "direct-model", "m", "direct-model", "m"]
    for i, model in enumerate(order):
        response, body = await fetch(
            client, reactor, proxy + "/v1/chat/completions", {**CHAT, "model": model},
            headers={"X-Request-ID": f"mix-{i}"},
        )
        assert response.code == 200, body
    egresses = [request_event(events, f"mix-{i}") for i in range(len(order))]
    assert [e["egress"] for e in egresses] == ["proxy", "direct", "proxy", "direct", "proxy"]
    assert {e["address"] for e in egresses if e["egress"] == "proxy"} == {f"127.0.0.1:{mini.port}"}
    assert {e["address"] for e in egresses if e["egress"] == "direct"} == {f"127.0.0.1:{port}"}
    assert mini.connects == [f"127.0.0.1:{port}"], "one tunnel, reused"


@pytest_twisted.ensureDeferred
async def test_direct_and_proxied_http_never_share_a_connection(
    reactor, upstreams, proxies, client, tinyproxy, events
):
    """Requests to one http upstream, alternately direct and via the proxy,
    each go their own way: a kept-alive direct connection never carries a
    proxied request, nor the other way round."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": {{urls: ["{base}"], via: proxy}}\n'
        f'model_routes:\n  "direct-model": {{urls: ["{base}"], via: direct}}\n'
        f'proxy_url: "{tinyproxy.url}"\n'
    )
    order = ["m", "direct-model", "m", "direct-model", "m", "direct-model"]
    for i, model in enumerate(order):
        response, body = await fetch(
            client, reactor, proxy + "/v1/chat/completions", {**CHAT, "model": model},
            headers={"X-Request-ID": f"way-{i}"},
        )
        assert response.code == 200, body
        relayed = upstream.requests[-1].headers.hasHeader(b"via")
        assert relayed == (model == "m"), (i, model)
        assert request_event(events, f"way-{i}")["egress"] == ("proxy" if model == "m" else "direct")


@pytest_twisted.ensureDeferred
async def test_internal_name_goes_direct_through_the_cache(
    reactor, upstreams, proxies, client, mini_proxies, events
):
    """An internal name resolves (once) to an internal address and goes direct."""
    upstream, base = await upstreams.start()
    mini = await mini_proxies()
    port = base.rsplit(":", 1)[1]
    proxies.resolver.hosts["llm.internal.test"] = ["127.0.0.1"]
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": "http://llm.internal.test:{port}"\n'
        f'proxy_url: "{mini.url}"\ndirect_networks: ["127.0.0.1/32"]\n'
    )
    for rid in ("n1", "n2"):
        response, body = await fetch(
            client, reactor, proxy + "/v1/chat/completions", CHAT, headers={"X-Request-ID": rid}
        )
        assert response.code == 200
        assert request_event(events, rid)["egress"] == "direct"
    assert not mini.requests and not mini.connects
    assert proxies.resolver.lookups.count("llm.internal.test") == 1


@pytest_twisted.ensureDeferred
async def test_connect_timeout_is_504(reactor, proxies, client) -> None:
    """An upstream that never accepts the connection: 504 after timeouts.connect."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            # Fill the accept queue so that further SYNs are dropped.
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            proxy = await proxies.start(
                egress_config(f'"http://127.0.0.1:{port}"', None, "timeouts: {connect: 0.5}\n")
            )
            response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
        finally:
            for filler in fillers:
                filler.close()
    assert response.code == 504, body
    error = json.loads(body)["error"]
    assert error["code"] == "upstream_connect_timeout"
    assert "0.5 s" in error["message"]


# -- pooled connections an upstream closes ------------------------------------


class _MemoryEndpoint:
    """Connects each protocol to a new StringTransport, at once."""

    def __init__(self) -> None:
        self.connections: list[tuple[Any, Any]] = []

    def connect(self, factory: Any) -> Any:
        address = IPv4Address("TCP", "127.0.0.1", 80)
        protocol = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


def _keep_alive_agent(clock: Any) -> tuple[Any, Any, _MemoryEndpoint]:
    """A real Agent and pool over watched in-memory connections."""
    watch = ConnectionWatch(clock, idle_timeout=50)
    memory = _MemoryEndpoint()

    class Endpoints:
        def endpointForURI(self, uri: Any) -> Any:
            return watch.wrap(memory)

    pool = HTTPConnectionPool(clock, persistent=True)
    return Agent.usingEndpointFactory(clock, Endpoints(), pool=pool), watch, memory


def _answer(protocol: Any, keep_alive: bytes = b"") -> None:
    protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + keep_alive + b"\r\n{}"
    )


def test_an_upstreams_keep_alive_timeout_closes_its_idle_pooled_connection() -> None:
    """A connection whose upstream said ``Keep-Alive: timeout=5`` is closed a
    second before that when idle in the pool, and the next request gets a new
    connection; one without the header stays for the pool's own timeout."""
    clock = MemoryReactorClock()
    agent, watch, memory = _keep_alive_agent(clock)
    agent.request(b"GET", b"http://up.test/a")
    protocol, transport = memory.connections[0]
    _answer(protocol, b"Keep-Alive: timeout=5, max=100\r\n")
    clock.advance(3.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting, "closed 1 s before the upstream's 5 s"
    assert watch.closed_idle == 1
    protocol.connectionLost(Failure(ConnectionDone()))
    agent.request(b"GET", b"http://up.test/b")
    assert len(memory.connections) == 2 and watch.made == 2

    # Without the header: kept for the pool's idle timeout.
    protocol, transport = memory.connections[1]
    _answer(protocol)
    clock.advance(49)
    assert not transport.disconnecting


def test_a_busy_connection_is_not_closed_by_its_keep_alive_timer() -> None:
    """The idle timer counts only while the connection waits in the pool: a
    request in progress past the timeout keeps its connection."""
    clock = MemoryReactorClock()
    agent, watch, memory = _keep_alive_agent(clock)
    agent.request(b"GET", b"http://up.test/a")
    protocol, transport = memory.connections[0]
    _answer(protocol, b"Keep-Alive: timeout=5\r\n")
    clock.advance(2)
    agent.request(b"GET", b"http://up.test/b")  # reuses it
    assert len(memory.connections) == 1
    clock.advance(10)
    assert not transport.disconnecting, "in use: not idle"
    _answer(protocol)
    clock.advance(3.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting


# -- TLS that cannot be set up, or never finishes ------------------------------


@pytest_twisted.ensureDeferred
async def test_a_tls_handshake_that_never_finishes_is_a_prompt_504(
    reactor, proxies, client, loopback, access
) -> None:
    """An https upstream that accepts TCP and then says nothing: the
    handshake is bounded by ``timeouts.connect``, not the 900 s response
    timeout, and the access record says why."""
    silent = await loopback(Factory.forProtocol(Protocol))
    port = silent.rsplit(":", 1)[1]
    proxy = await proxies.start(
        f'target_map:\n  "/v1/": "https://127.0.0.1:{port}"\ntimeouts: {{connect: 0.3}}\n'
    )
    started = reactor.seconds()
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert reactor.seconds() - started < 5
    assert response.code == 504, body
    error = json.loads(body)["error"]
    assert error["code"] == "upstream_connect_timeout"
    assert "TLS handshake with 127.0.0.1:" in error["message"]
    await access.wait(1).addTimeout(10, reactor)
    assert "did not finish within 0.3 s" in access[-1]["error"]


@implementer(IOpenSSLClientConnectionCreator)
class _BrokenCreator:
    """A TLS connection creator that fails as pyOpenSSL does under a sandbox
    forbidding writable-executable memory."""

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        raise MemoryError("Cannot allocate write+execute memory for ffi.callback()")


class _BrokenPolicy:
    def creatorForNetloc(self, hostname: bytes, port: int) -> _BrokenCreator:
        return _BrokenCreator()


def test_tls_that_cannot_be_set_up_fails_at_once_naming_why() -> None:
    """A TLS setup error (here the sandbox's MemoryError) fails the request
    before any connection is tried, with what went wrong, instead of an
    unhandled error in the reactor and a request left waiting."""
    clock = MemoryReactorClock()
    endpoints = DirectEndpoints(clock, _BrokenPolicy(), 10.0)
    with pytest.raises(TLSSetupError) as raised:
        endpoints.endpointForURI(URI.fromBytes(b"https://api.external.test/v1"))
    assert "TLS setup for api.external.test:443 failed" in str(raised.value)
    assert "write+execute" in str(raised.value)
    assert clock.tcpClients == []
    # Plain http needs no TLS.
    endpoints.endpointForURI(URI.fromBytes(b"http://api.external.test/v1"))
