"""Client connection limits over real loopback sockets.

What only sockets show: a crowd of connections from one address (127.0.0.1)
and a client from another (127.0.0.2, the client socket bound to it); idle
keep-alive connections closed for a newcomer at max_connections; clients
behind a real ``haproxy:`` listener told apart by their PROXY headers; and
heads refused with JSON errors on the wire. Every wait is bounded, and
nothing is proved by waiting for it not to happen: the Site's own count
says which connections it holds.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from conftest import timeout
from raw_http import Gateways, Peer, assert_chat, chat, http
from twisted.internet.defer import Deferred

HAPROXY = "haproxy:tcp:0:interface=127.0.0.1"


def closed_count(peers: list[Peer], count: int) -> Deferred[None]:
    """A Deferred firing once ``count`` of ``peers`` are closed."""
    done: Deferred[None] = Deferred()
    seen = 0

    def one(result: Any) -> Any:
        nonlocal seen
        seen += 1
        if seen == count:
            done.callback(None)
        return result

    for peer in peers:
        peer.closed.addBoth(one)
    return done


def proxy_header(client: bytes) -> bytes:
    """A PROXY protocol v1 header naming ``client`` as the source."""
    return b"PROXY TCP4 %s 127.0.0.1 40000 80\r\n" % client


@pytest_twisted.ensureDeferred
async def test_a_crowd_from_one_address_leaves_room_for_another(gateways: Gateways) -> None:
    """Fifty silent connections from 127.0.0.1 with a cap of 20: the daemon
    keeps 20 and closes the other 30 at once, unanswered; a client from
    127.0.0.2 is then served, and so is one of the crowd."""
    gw = await gateways.start("max_connections_per_client: 20\n")
    site = gateways.proxies.sites[-1]
    crowd = [await gw.connect() for _ in range(50)]
    await timeout(closed_count(crowd, 30), gateways.reactor)
    assert site.connections.count("127.0.0.1") == 20
    turned_away = [p for p in crowd if p.closed.called]
    assert len(turned_away) == 30 and all(p.unread() == b"" for p in turned_away)
    other = await gw.connect(source="127.0.0.2")
    assert_chat(await other.exchange(chat("other")), "other")
    kept = next(p for p in crowd if not p.closed.called)
    assert_chat(await kept.exchange(chat("kept")), "kept")
    registry = gateways.proxies.gateways[-1].metrics.registry
    value = registry.get_sample_value("llmproxy_connections_refused_total",
                                      {"reason": "per_client"})
    assert value == 30


@pytest_twisted.ensureDeferred
async def test_at_max_connections_a_newcomer_gets_the_oldest_idle_ones_place(
    gateways: Gateways,
) -> None:
    """Ten kept-alive connections fill max_connections: a client from
    127.0.0.2 still gets in and is served, and the connection idle the
    longest is the one closed; the others stay open."""
    gw = await gateways.start("max_connections: 10\nmax_connections_per_client: 100\n")
    site = gateways.proxies.sites[-1]
    held = [await gw.connect() for _ in range(10)]
    for i, peer in enumerate(held):
        assert_chat(await peer.exchange(chat(f"held{i}")), f"held{i}")
    assert site.open_connections == 10 and site.connections.idle == 10
    newcomer = await gw.connect(source="127.0.0.2")
    assert_chat(await newcomer.exchange(chat("newcomer")), "newcomer")
    await held[0].wait_closed()
    assert held[0].unread() == b""
    assert site.connections.count("127.0.0.1") == 9
    assert not any(p.closed.called for p in held[1:])


@pytest_twisted.ensureDeferred
async def test_behind_a_proxy_protocol_listener_the_cap_is_per_named_client(
    gateways: Gateways,
) -> None:
    """Through one balancer (127.0.0.3), two requests in flight for the
    client 127.9.8.7 fill its cap of 2: a third connection naming it is
    closed unanswered, while one naming 127.9.8.8 is served."""
    gw = await gateways.start(f'listen: "{HAPROXY}"\nmax_connections_per_client: 2\n',
                              endpoint=HAPROXY)
    site = gateways.proxies.sites[-1]
    peers = [await gw.connect(source="127.0.0.3") for _ in range(4)]
    for peer in peers[:2]:
        arrived = gw.upstream.next_request()
        peer.transport.write(proxy_header(b"127.9.8.7")
                             + chat("held", b"X-Fake-Header-Delay: 30"))
        await timeout(arrived, gateways.reactor)
    assert site.connections.count("127.9.8.7") == 2
    assert site.connections.count("127.0.0.3") == 0
    peers[2].transport.write(proxy_header(b"127.9.8.7") + chat("third"))
    await peers[2].wait_closed()
    assert peers[2].unread() == b""
    reply = await peers[3].exchange(proxy_header(b"127.9.8.8") + chat("other"))
    assert_chat(reply, "other")
    assert len(gw.upstream.requests) == 3


@pytest.mark.parametrize(
    "request_bytes, status, code",
    [
        (http(b"GET", b"/v1/models", b"", *(b"X-H%d: 1" % i for i in range(1000))),
         431, "headers_too_large"),
        (b"GET /v1/models HTTP/1.1\r\nAccept: */*\r\n\r\n", 400, "bad_host"),
        (http(b"GET", b"/v1/models", b"", b"Host: other.test"), 400, "bad_host"),
    ],
    ids=["1000-headers", "no-host", "two-hosts"],
)
@pytest_twisted.ensureDeferred
async def test_refused_heads_get_a_json_error_on_the_wire(
    gateways: Gateways, request_bytes: bytes, status: int, code: str
) -> None:
    """A head with 1,000 header lines gets a complete JSON 431, and an
    HTTP/1.1 request without a Host or with two a JSON 400 ``bad_host``;
    then the connection closes, nothing reached the upstream, and the next
    client is served."""
    gw = await gateways.start()
    peer = await gw.connect()
    reply = await peer.exchange(request_bytes)
    assert reply.status == status
    assert reply.header(b"content-type") == b"application/json"
    assert reply.json()["error"]["code"] == code
    await peer.wait_closed()
    assert peer.unread() == b""
    assert list(gw.upstream.requests) == []
    assert_chat(await (await gw.connect()).exchange(chat("next")), "next")
