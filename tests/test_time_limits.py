"""Every time limit and wait of a request, on a fake clock.

The gateway runs as the daemon builds it (``Gateway`` and its Site), on a
``MemoryReactorClock`` with an in-memory upstream: the response-header
timeout, stream idle, a slow reader, a slow client, a short Retry-After,
ejection and its cooldown, the client idle timeout and drain, each checked
just before and just after its limit, with nothing waiting on the wall
clock.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from memory_gateway import ONE_UPSTREAM, MemoryGateway, post
from twisted.web.iweb import UNKNOWN_LENGTH

SSE = {b"content-type": [b"text/event-stream"]}
JSON = {b"content-type": [b"application/json"]}
TWO_UPSTREAMS = 'target_map: {"/v1/": {urls: ["http://a.test", "http://b.test"]}}\n'


@pytest.fixture
def make() -> Iterator[object]:
    """``make(config)``: a MemoryGateway, closed after the test."""
    made: list[MemoryGateway] = []

    def build(config: str = ONE_UPSTREAM) -> MemoryGateway:
        gateway = MemoryGateway(config)
        made.append(gateway)
        return gateway

    yield build
    for gateway in made:
        gateway.close()


def test_no_response_head_within_response_header_is_504_and_not_retried(make) -> None:
    """The head must come within ``timeouts.response_header``: at that moment
    the client gets a 504 ``upstream_timeout``, the upstream request is
    cancelled, and it is not retried on the other upstream."""
    gw = make(TWO_UPSTREAMS + "timeouts: {response_header: 20}\n")
    client = gw.connect()
    client.send(post())
    assert len(gw.sent) == 1
    gw.advance(19.9)
    assert client.reply() is None and not gw.sent[0].cancelled
    gw.advance(0.1)
    reply = client.reply()
    assert reply is not None and reply.status == 504
    assert reply.json()["error"]["code"] == "upstream_timeout"
    assert "within 20 s" in reply.json()["error"]["message"]
    assert gw.sent[0].cancelled
    assert len(gw.sent) == 1, "the client waited long enough: no second upstream"
    assert gw.records[-1]["error_code"] == "upstream_timeout"


def test_a_silent_stream_is_cut_off_after_stream_idle(make) -> None:
    """A stream whose upstream sends nothing for ``stream_idle`` seconds is
    closed without its final chunk (truncated for the client), and recorded
    as ``stream_idle``; a byte within the limit starts the count again."""
    gw = make(ONE_UPSTREAM + "timeouts: {stream_idle: 10}\n")
    client = gw.connect()
    client.send(post())
    response = gw.sent[0].respond(200, SSE)
    response.write(b"data: 1\n\n")
    gw.advance(9)
    response.write(b"data: 2\n\n")
    gw.advance(9)
    assert not client.closed and not response.transport.stopped
    gw.advance(1)
    assert response.transport.stopped, "the upstream connection is closed"
    gw.advance(0)  # the close arrives on the next turn
    assert client.closed
    assert b"data: 2" in client.unread() and not client.unread().endswith(b"0\r\n\r\n")
    assert gw.records[-1]["outcome"] == "upstream_aborted"
    assert gw.records[-1]["error_code"] == "stream_idle"


def test_a_head_then_silence_is_504_before_the_first_byte(make) -> None:
    """A head followed by no body byte for ``stream_idle`` seconds is a
    failure before the first byte: a 504 JSON error, not a cut stream."""
    gw = make(ONE_UPSTREAM + "timeouts: {stream_idle: 10}\n")
    client = gw.connect()
    client.send(post())
    gw.sent[0].respond(200, SSE)
    gw.advance(10)
    gw.advance(0)
    reply = client.reply()
    assert reply is not None and reply.status == 504
    assert "no body byte for 10 s" in reply.json()["error"]["message"]


def test_a_slow_reader_pauses_the_upstream_and_is_not_stream_idle(make) -> None:
    """A client that stops reading pauses the upstream connection (nothing
    is buffered in the proxy); silence then is the client's doing, so the
    stream-idle limit does not cut it off however long it lasts; reading
    again resumes the upstream and the rest arrives."""
    gw = make(ONE_UPSTREAM + "timeouts: {stream_idle: 10}\n")
    client = gw.connect()
    client.send(post())
    response = gw.sent[0].respond(200, SSE)
    response.write(b"data: 1\n\n")
    client.stop_reading()
    assert response.transport.paused
    gw.advance(600)
    assert not response.transport.stopped and not client.closed
    client.read_again()
    assert not response.transport.paused
    response.write(b"data: 2\n\n")
    response.finish()
    reply = client.reply()
    assert reply is not None and reply.status == 200
    assert reply.body == b"data: 1\n\ndata: 2\n\n"
    assert gw.records[-1]["outcome"] == "ok"


def test_a_short_retry_after_is_waited_out_once(make) -> None:
    """A lone upstream's 429 with ``Retry-After: 1`` (within
    ``max_retry_wait``) is retried on it after exactly that long; the client
    sees only the answer to the second try, with two attempts counted."""
    gw = make(ONE_UPSTREAM)
    client = gw.connect()
    client.send(post())
    first = gw.sent[0].respond(429, {b"retry-after": [b"1"], **JSON}, length=2)
    assert first.transport.stopped, "the refused answer is thrown away"
    gw.advance(0.99)
    assert len(gw.sent) == 1 and client.reply() is None
    gw.advance(0.01)
    assert len(gw.sent) == 2
    second = gw.sent[1].respond(200, JSON, length=2)
    second.write(b"{}")
    second.finish()
    reply = client.reply()
    assert reply is not None and reply.status == 200
    assert reply.header(b"x-llmproxy-upstream-attempts") == b"2"


def test_a_retry_after_longer_than_max_retry_wait_goes_to_the_client(make) -> None:
    """A Retry-After beyond ``max_retry_wait`` is the client's to honour."""
    gw = make(ONE_UPSTREAM + "max_retry_wait: 5\n")
    client = gw.connect()
    client.send(post())
    response = gw.sent[0].respond(429, {b"retry-after": [b"30"], **JSON}, length=2)
    response.write(b"{}")
    response.finish()
    reply = client.reply()
    assert reply is not None and reply.status == 429
    assert reply.header(b"retry-after") == b"30"
    gw.advance(60)
    assert len(gw.sent) == 1


def test_a_client_leaving_while_retry_after_runs_sends_nothing_more(make) -> None:
    """The wait for a Retry-After ends with the client: no second request."""
    gw = make(ONE_UPSTREAM)
    client = gw.connect()
    client.send(post())
    gw.sent[0].respond(429, {b"retry-after": [b"1"]}, length=0)
    client.leave()
    gw.advance(5)
    assert len(gw.sent) == 1
    assert gw.records[-1]["outcome"] == "client_closed"


def test_an_ejected_upstream_gets_one_trial_after_its_cooldown(make) -> None:
    """With ``eject_after: 1`` a failed upstream is left out of the rotation
    for ``cooldown`` seconds, then tried once more."""
    gw = make(
        'target_map: {"/v1/": {urls: ["http://a.test", "http://b.test"], '
        "eject_after: 1, cooldown: 30}}\n"
    )

    def serve(index: int) -> bytes:
        sent = gw.sent[index]
        if sent.uri.startswith(b"http://a.test"):
            sent.fail(ConnectionRefusedError())
            return b"a"
        response = sent.respond(200, JSON, length=2)
        response.write(b"{}")
        response.finish()
        return b"b"

    client = gw.connect()
    client.send(post())
    assert serve(0) == b"a" and serve(1) == b"b", "a failed: retried on b"
    for _ in range(3):
        client.send(post())
        assert serve(len(gw.sent) - 1) == b"b", "a is out of the rotation"
    gw.advance(29)
    client.send(post())
    assert serve(len(gw.sent) - 1) == b"b"
    gw.advance(1)
    client.send(post())
    assert gw.sent[-1].uri.startswith(b"http://a.test"), "a's trial after 30 s"


def test_an_idle_keep_alive_connection_is_closed_after_client_idle(make) -> None:
    """A kept-alive connection with no request for ``client_idle`` seconds is
    closed; one in use is not."""
    gw = make(ONE_UPSTREAM + "timeouts: {client_idle: 60}\n")
    client = gw.connect()
    client.send(post())
    gw.advance(90)  # waiting for the upstream is not idleness
    assert not client.closed
    response = gw.sent[0].respond(200, JSON, length=2)
    response.write(b"{}")
    response.finish()
    assert client.reply() is not None
    gw.advance(59)
    assert not client.closed
    gw.advance(1)
    assert client.closed


def test_a_request_must_arrive_within_request_read(make) -> None:
    """A client dribbling a request gets a 408 ``request_timeout`` at
    ``request_read`` seconds from its first byte, however often it sends."""
    gw = make(ONE_UPSTREAM + "timeouts: {request_read: 30, client_idle: 600}\n")
    client = gw.connect()
    for _ in range(29):
        client.send(b"X")
        gw.advance(1)
    assert not client.closed
    gw.advance(1)
    reply = client.reply()
    assert reply is not None and reply.status == 408
    assert reply.json()["error"]["code"] == "request_timeout"
    assert client.closed
    assert gw.sent == []


def test_a_slow_upstream_is_not_a_slow_client(make) -> None:
    """``request_read`` ends when the request is in: an upstream taking longer
    than that to answer is waited for."""
    gw = make(ONE_UPSTREAM + "timeouts: {request_read: 30}\n")
    client = gw.connect()
    client.send(post())
    gw.advance(120)
    response = gw.sent[0].respond(200, JSON, length=2)
    response.write(b"{}")
    response.finish()
    reply = client.reply()
    assert reply is not None and reply.status == 200


def test_a_client_leaving_cancels_the_upstream_request(make) -> None:
    """A client that leaves before the head arrives cancels the upstream
    request; one that leaves mid-stream closes the upstream connection."""
    gw = make(ONE_UPSTREAM)
    waiting = gw.connect()
    waiting.send(post())
    waiting.leave()
    assert gw.sent[0].cancelled
    streaming = gw.connect()
    streaming.send(post())
    response = gw.sent[1].respond(200, SSE)
    response.write(b"data: 1\n\n")
    streaming.leave()
    assert response.transport.stopped
    assert [r["outcome"] for r in gw.records] == ["client_closed", "client_closed"]


def test_stopping_waits_for_requests_in_flight_up_to_shutdown_grace(make) -> None:
    """Stopping the gateway lets a request in flight finish; one still
    running at ``shutdown_grace`` is closed, and the stop completes then."""
    gw = make(ONE_UPSTREAM + "shutdown_grace: 30\n")
    finishing = gw.connect()
    finishing.send(post())
    stuck = gw.connect()
    stuck.send(post())
    stopped = gw.gateway.stopService()
    gw.advance(10)
    response = gw.sent[0].respond(200, JSON, length=2)
    response.write(b"{}")
    response.finish()
    assert finishing.reply() is not None
    assert not stopped.called and not stuck.closed
    gw.advance(20)
    assert stuck.closed
    assert stopped.called


def test_a_stream_of_unknown_length_is_chunked_and_ends_with_its_last_chunk(make) -> None:
    """A body without a length reaches the client chunked; its clean end is
    the terminating chunk (never a close)."""
    gw = make(ONE_UPSTREAM)
    client = gw.connect()
    client.send(post())
    response = gw.sent[0].respond(200, SSE, length=UNKNOWN_LENGTH)
    response.write(b"data: 1\n\n")
    response.finish()
    assert client.unread().endswith(b"0\r\n\r\n")
    reply = client.reply()
    assert reply is not None and reply.header(b"transfer-encoding") == b"chunked"
    assert not client.closed
