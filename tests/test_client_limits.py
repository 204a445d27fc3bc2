"""Client connection limits on a fake clock: first-request deadline, per-client
cap, idle connections closed for room, Host and header-count checks.

The gateway runs as the daemon builds it (``Gateway`` and its Site) on a
``MemoryReactorClock``, clients being the Site's own channel on a
``StringTransport`` (tests/memory_gateway.py). Each limit is checked just
below and just past its boundary; nothing waits on the wall clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from memory_gateway import ONE_UPSTREAM, Client, MemoryGateway, memory_gateways, post
from twisted.logger import globalLogPublisher

from llmproxy.web import default_max_connections_per_client

JSON = {b"content-type": [b"application/json"]}


@pytest.fixture
def make() -> Iterator[Callable[..., MemoryGateway]]:
    """``make(config)``: a MemoryGateway, closed after the test."""
    with memory_gateways() as build:
        yield build


@pytest.fixture
def web_log() -> Iterator[list[dict[str, Any]]]:
    """The ``llmproxy.web`` log events of the test."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "llmproxy.web":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def answer(gw: MemoryGateway, client: Client, index: int = -1) -> None:
    """Answer the request sent upstream at ``index`` with 200 ``{}``; the
    client reads it, leaving its connection idle."""
    response = gw.sent[index].respond(200, JSON, length=2)
    response.write(b"{}")
    response.finish()
    reply = client.reply()
    assert reply is not None and reply.status == 200


def served(gw: MemoryGateway, host: str) -> Client:
    """A connection from ``host`` that made one request and now waits
    (idle) for its next."""
    client = gw.connect(host)
    client.send(post())
    answer(gw, client)
    return client


def times_out_at(gw: MemoryGateway, client: Client, seconds: float) -> None:
    """``client`` stays open just short of ``seconds`` from now, and gets a
    408 ``request_timeout`` and a close at ``seconds``."""
    gw.advance(seconds - 0.1)
    assert not client.closed
    gw.advance(0.1)
    reply = client.reply()
    assert reply is not None and reply.status == 408
    assert reply.json()["error"]["code"] == "request_timeout"
    assert client.closed


def refused_at_once(client: Client) -> bool:
    """Whether the gateway closed ``client`` as soon as it connected, having
    written nothing."""
    return client.closed and client.transport.value() == b""


def sample(gw: MemoryGateway, name: str, **labels: str) -> float:
    """A metric's value (0 when it has none yet)."""
    value = gw.gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def request(*lines: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    """``GET /v1/models`` with exactly the given header lines."""
    return b"\r\n".join([b"GET /v1/models " + version, *lines]) + b"\r\n\r\n"


# -- the first request's deadline ----------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_at_request_read(make) -> None:
    """A new connection that sends no byte is closed ``request_read`` seconds
    after the accept (not ``client_idle``), without an answer: it never
    asked anything."""
    gw = make(ONE_UPSTREAM + "timeouts: {request_read: 30, client_idle: 600}\n")
    client = gw.connect()
    gw.advance(29.9)
    assert not client.closed
    gw.advance(0.1)
    assert client.closed and client.transport.value() == b""
    client.close_completes()
    assert gw.site.open_connections == 0


def test_the_first_request_must_be_whole_within_request_read_of_the_accept(make) -> None:
    """The first request's deadline starts at the accept, not at its first
    byte: a request begun late still has to end by then (408)."""
    gw = make(ONE_UPSTREAM + "timeouts: {request_read: 30, client_idle: 600}\n")
    client = gw.connect()
    gw.advance(29)
    client.send(b"P")
    times_out_at(gw, client, 1)
    assert gw.sent == []


def test_a_first_request_whole_just_before_request_read_is_served(make) -> None:
    """A first request whole just before the deadline is forwarded, and the
    deadline no longer applies while it is answered."""
    gw = make(ONE_UPSTREAM + "timeouts: {request_read: 30, client_idle: 600}\n")
    client = gw.connect()
    gw.advance(29.9)
    client.send(post())
    assert len(gw.sent) == 1
    gw.advance(120)
    assert not client.closed
    answer(gw, client)


def test_between_requests_client_idle_applies_then_request_read_from_the_first_byte(
    make,
) -> None:
    """A kept-alive connection waits ``client_idle`` for its next request
    (``request_read`` does not apply while it is idle); once that request's
    first byte arrives, it must be whole within ``request_read``."""
    gw = make(ONE_UPSTREAM + "timeouts: {request_read: 30, client_idle: 60}\n")
    client = served(gw, "10.0.0.1")
    gw.advance(59)
    assert not client.closed
    client.send(b"P")
    times_out_at(gw, client, 30)


def test_an_idle_connection_is_closed_at_client_idle(make) -> None:
    """Between requests, ``client_idle`` seconds without a byte close the
    connection, quietly."""
    gw = make(ONE_UPSTREAM + "timeouts: {request_read: 30, client_idle: 60}\n")
    client = served(gw, "10.0.0.1")
    gw.advance(59.9)
    assert not client.closed
    gw.advance(0.1)
    assert client.closed and client.unread() == b""


def test_a_pipelined_request_gets_its_deadline_once_the_previous_is_answered(make) -> None:
    """Part of a second request sent behind the first waits, unparsed, while
    the first is answered; its ``request_read`` runs from then on."""
    gw = make(ONE_UPSTREAM + "timeouts: {request_read: 30, client_idle: 600}\n")
    client = gw.connect()
    client.send(post() + b"GET /v1/mod")
    gw.advance(100)  # the upstream is slow: the second request waits
    assert not client.closed
    answer(gw, client)
    times_out_at(gw, client, 30)


# -- max_connections_per_client ------------------------------------------------


def test_past_max_connections_per_client_a_new_connection_is_closed_at_once(
    make, web_log
) -> None:
    """The client's connections up to the cap are accepted; one more from
    that address is closed as soon as it is accepted (nothing read, nothing
    written) and counted, while another address still gets in; once one of
    the first closes, the address may connect again."""
    gw = make(ONE_UPSTREAM + "max_connections_per_client: 3\n")
    first = [gw.connect("10.0.0.1") for _ in range(3)]
    assert not any(c.closed for c in first)
    extra = gw.connect("10.0.0.1")
    assert refused_at_once(extra)
    assert sample(gw, "llmproxy_connections_refused_total", reason="per_client") == 1
    other = gw.connect("10.0.0.2")
    assert not other.closed
    other.send(post())
    assert len(gw.sent) == 1
    assert gw.site.connections.count("10.0.0.1") == 3
    first[0].leave()
    again = gw.connect("10.0.0.1")
    assert not again.closed
    warnings = [e for e in web_log if "max_connections_per_client" in e["log_format"]]
    assert len(warnings) == 1 and warnings[0]["client"] == "10.0.0.1"


def test_a_clients_own_oldest_idle_connection_makes_room_for_its_new_one(make) -> None:
    """At its cap, a client's oldest idle keep-alive connection is closed to
    make room for its new one (its pool never locks it out); its busy
    connections and other clients' idle ones are left alone."""
    gw = make(ONE_UPSTREAM + "max_connections_per_client: 3\n")
    older, newer = served(gw, "10.0.0.1"), served(gw, "10.0.0.1")
    busy = gw.connect("10.0.0.1")
    busy.send(post())
    someone_else = served(gw, "10.0.0.2")
    fresh = gw.connect("10.0.0.1")
    assert not fresh.closed
    assert older.closed and older.unread() == b""
    assert not newer.closed and not busy.closed and not someone_else.closed
    assert sample(gw, "llmproxy_idle_connections_closed_total", reason="per_client") == 1
    assert gw.site.connections.count("10.0.0.1") == 3
    older.close_completes()
    assert gw.site.connections.count("10.0.0.1") == 3


def test_a_client_with_no_idle_connection_at_its_cap_is_refused(make) -> None:
    """An idle connection that got the first byte of its next request is no
    longer idle: at the cap, the new connection is the one refused."""
    gw = make(ONE_UPSTREAM + "max_connections_per_client: 2\n")
    one, two = served(gw, "10.0.0.1"), served(gw, "10.0.0.1")
    one.send(b"G")
    two.send(b"G")
    extra = gw.connect("10.0.0.1")
    assert refused_at_once(extra)
    assert not one.closed and not two.closed


def test_refusals_are_logged_at_most_every_10_s_with_their_count(make, web_log) -> None:
    """A flood of refused connections writes one warning per 10 s, and the
    next one says how many were refused since the previous."""
    gw = make(ONE_UPSTREAM + "max_connections_per_client: 1\n")
    gw.connect("10.0.0.1")
    for _ in range(100):
        assert refused_at_once(gw.connect("10.0.0.1"))

    def warnings() -> list[dict[str, Any]]:
        return [e for e in web_log if "max_connections_per_client" in e["log_format"]]

    assert len(warnings()) == 1 and warnings()[0]["count"] == 1
    gw.advance(9.9)
    gw.connect("10.0.0.1")
    assert len(warnings()) == 1
    gw.advance(0.1)
    gw.connect("10.0.0.1")
    assert len(warnings()) == 2 and warnings()[1]["count"] == 101
    assert sample(gw, "llmproxy_connections_refused_total", reason="per_client") == 102


def test_the_per_client_table_holds_only_addresses_with_open_connections(make) -> None:
    """Addresses are forgotten with their last connection, whether it closed
    by itself, for room, at a timeout or was refused."""
    gw = make(ONE_UPSTREAM + "max_connections_per_client: 1\ntimeouts: {request_read: 5}\n")
    clients = [gw.connect(f"10.1.{i // 250}.{i % 250}") for i in range(1000)]
    assert gw.site.connections.tracked_clients == 1000
    for client in clients[:500]:
        client.leave()
    assert gw.site.connections.tracked_clients == 500
    assert refused_at_once(gw.connect("10.1.2.100"))  # clients[600]'s address
    gw.advance(5)  # the silent rest are closed at request_read
    for client in clients[500:]:
        client.close_completes()
    assert gw.site.connections.tracked_clients == 0
    assert gw.site.open_connections == 0 and gw.site.connections.idle == 0


def test_trusted_proxies_count_against_no_client(make) -> None:
    """A reverse proxy in ``trusted_proxies`` speaks for many clients: its
    connections are not capped per client (only by max_connections)."""
    gw = make(ONE_UPSTREAM + "max_connections_per_client: 2\ntrusted_proxies: [10.0.0.0/8]\n")
    clients = [gw.connect("10.0.0.1") for _ in range(10)]
    assert not any(c.closed for c in clients)
    assert gw.site.connections.tracked_clients == 0


def test_behind_a_proxy_protocol_listener_the_header_names_the_client(make) -> None:
    """On a ``haproxy:`` listener every connection comes from the balancer;
    each counts against the client its PROXY header names, from its first
    request byte: past the cap that connection is closed unanswered."""
    gw = make(ONE_UPSTREAM + 'listen: "haproxy:tcp:8000"\nmax_connections_per_client: 2\n')
    through = [gw.connect("10.9.9.9") for _ in range(5)]
    assert not any(c.closed for c in through), "the balancer is no client"
    for client in through[:3]:
        client.proxy_header_names("203.0.113.5")
    through[0].send(post())
    through[1].send(post())
    assert gw.site.connections.count("203.0.113.5") == 2
    through[2].send(post())
    assert through[2].closed and through[2].transport.value() == b""
    assert len(gw.sent) == 2
    assert sample(gw, "llmproxy_connections_refused_total", reason="per_client") == 1
    through[3].proxy_header_names("203.0.113.6")
    through[3].send(post())
    assert len(gw.sent) == 3 and not through[3].closed
    through[2].close_completes()
    assert gw.site.open_connections == 4


def test_the_default_cap_is_a_sixteenth_of_max_connections_at_least_8(make) -> None:
    """Without ``max_connections_per_client``, one address may hold
    max_connections // 16 connections, and at least 8."""
    assert default_max_connections_per_client(10_000) == 625
    assert default_max_connections_per_client(100) == 8
    gw = make(ONE_UPSTREAM + "max_connections: 320\n")
    clients = [gw.connect("10.0.0.1") for _ in range(20)]
    assert not any(c.closed for c in clients)
    assert refused_at_once(gw.connect("10.0.0.1"))


# -- max_connections -----------------------------------------------------------


def test_at_max_connections_the_oldest_idle_connection_makes_room(make) -> None:
    """At max_connections a new client gets in: the connection idle the
    longest is closed for it (busy and brand-new ones never are), and the
    listening port keeps accepting; with none idle left, the next one is
    refused and the port paused until a connection becomes idle."""
    gw = make(ONE_UPSTREAM + "max_connections: 4\n")
    port = gw.listen()
    idle_first, idle_second = served(gw, "10.0.0.1"), served(gw, "10.0.0.2")
    busy = gw.connect("10.0.0.3")
    busy.send(post())
    gw.connect("10.0.0.4")  # open, no byte yet
    assert gw.site.open_connections == 4 and port.reading, "idle ones make room"
    newcomer = gw.connect("10.0.0.5")
    assert not newcomer.closed
    assert idle_first.closed and not idle_second.closed
    gw.connect("10.0.0.6")
    assert idle_second.closed and not busy.closed
    assert sample(gw, "llmproxy_idle_connections_closed_total", reason="max_connections") == 2
    assert not port.reading, "full, and none idle"
    assert sample(gw, "llmproxy_max_connections_reached_total") == 1
    late = gw.connect("10.0.0.7")  # accepted in the same burst as the pause
    assert refused_at_once(late)
    assert sample(gw, "llmproxy_connections_refused_total", reason="max_connections") == 1
    answer(gw, busy, index=-1)  # busy becomes idle: room again
    assert port.reading
    assert not gw.connect("10.0.0.8").closed and busy.closed
    idle_first.close_completes()
    idle_second.close_completes()
    assert gw.site.open_connections == 4


def test_below_max_connections_no_idle_connection_is_closed(make) -> None:
    """Just below the limit a new connection closes nothing; at it, one."""
    gw = make(ONE_UPSTREAM + "max_connections: 3\n")
    port = gw.listen()
    idle = [served(gw, f"10.0.0.{i}") for i in range(2)]
    gw.connect("10.0.0.9")
    assert not any(c.closed for c in idle) and port.reading
    gw.connect("10.0.0.10")
    assert idle[0].closed and not idle[1].closed


def test_an_idle_connection_closed_for_room_is_aborted_if_it_never_drains(make) -> None:
    """Closing an idle connection lets what is queued for it go out; one
    whose client reads nothing is aborted ``abortTimeout`` seconds later."""
    gw = make(ONE_UPSTREAM + "max_connections: 1\n")
    stuck = served(gw, "10.0.0.1")
    gw.connect("10.0.0.2")
    assert stuck.closed and not stuck.transport.disconnected
    gw.advance(stuck.protocol.abortTimeout)
    assert stuck.transport.disconnected


# -- Host and header lines -----------------------------------------------------


@pytest.mark.parametrize(
    "head, detail",
    [
        (request(), "needs a Host header"),
        (request(b"Host: a.test", b"Host: b.test"), "one Host header, not 2"),
        (request(b"Host: a.test/evil"), "not a host name"),
        (request(b"Host: a.test:80:81"), "not a host name"),
    ],
    ids=["missing", "two", "path-in-host", "two-ports"],
)
def test_a_request_without_exactly_one_valid_host_is_400(make, head: bytes, detail: str) -> None:
    """An HTTP/1.1 request with no Host, two Host lines or an invalid Host
    gets a JSON 400 ``bad_host`` before anything is routed, then a close."""
    gw = make()
    client = gw.connect()
    client.send(head)
    reply = client.reply()
    assert reply is not None and reply.status == 400
    error = reply.json()["error"]
    assert (error["code"], error["type"]) == ("bad_host", "invalid_request_error")
    assert detail in error["message"]
    assert client.closed and gw.sent == []


@pytest.mark.parametrize(
    "head",
    [request(version=b"HTTP/1.0"), request(b"Host: gw.test"), request(b"Host: gw.test:8000"),
     request(b"Host: [::1]:8000"), request(b"Host: 10.0.0.1")],
    ids=["http-1.0-without-host", "name", "name-and-port", "ipv6-and-port", "ipv4"],
)
def test_a_proper_host_or_http10_without_one_is_routed(make, head: bytes) -> None:
    """One valid Host (a name, an address, with a port or not), or none on
    HTTP/1.0, is routed as usual."""
    gw = make()
    gw.connect().send(head)
    assert len(gw.sent) == 1


def test_a_body_behind_a_bad_host_is_never_read(make) -> None:
    """The Host check comes at the end of the head: the body is not read,
    no ``100 Continue`` is sent, and the request is never rendered."""
    gw = make()
    client = gw.connect()
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nExpect: 100-continue\r\n"
                b"Content-Length: 2\r\nX-Request-ID: no-host\r\n\r\n{}")
    reply = client.reply()
    assert reply is not None and reply.status == 400
    assert reply.header(b"x-request-id") == b"no-host"
    assert client.unread() == b"" and gw.sent == []


@pytest.mark.parametrize("lines, status", [(500, None), (501, 431)])
def test_header_lines_past_max_headers_get_a_json_431(make, lines: int, status: int | None) -> None:
    """500 header lines (twisted.web's ``maxHeaders``, Host included) are
    routed; one more gets the JSON 431 ``headers_too_large`` the other
    oversized heads get, not twisted.web's bare 400."""
    gw = make()
    client = gw.connect()
    client.send(request(b"Host: gw.test", *(b"X-H%d: 1" % i for i in range(lines - 1))))
    if status is None:
        assert len(gw.sent) == 1 and not client.closed
        return
    reply = client.reply()
    assert reply is not None and reply.status == 431
    assert reply.json()["error"]["code"] == "headers_too_large"
    assert "more than 500 request header lines" in reply.json()["error"]["message"]
    assert client.closed and gw.sent == []
