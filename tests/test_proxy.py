"""Forwarding end to end over loopback: routing, streaming, headers, errors, ids."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.web.client import ResponseFailed
from twisted.web.resource import Resource

from helpers import collect, fetch, header, raw_connect, send
from llmproxy.config import parse_config_text
from llmproxy.app import Gateway
from llmproxy.web import build_site

WAIT = 10.0

CHAT = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "Hello there"}],
}


def config(*, target: dict[str, str], models: dict[str, list[str]] | None = None,
           extra: str = "") -> str:
    """Render a config with the given target_map and model_routes."""
    lines = ["target_map:"]
    lines += [f'  "{k}": "{v}"' for k, v in target.items()]
    if models:
        lines.append("model_routes:")
        for name, urls in models.items():
            lines.append(f'  "{name}":')
            lines.append("    urls:")
            lines += [f'      - "{u}"' for u in urls]
    return "\n".join(lines) + "\n" + extra


async def one_proxy(upstreams: Any, proxies: Any, extra: str = "") -> tuple[Any, str, str]:
    """One fake upstream behind a proxy routing ``/v1/`` to it."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(config(target={"/v1/": base, "/echo": base, "/echo/": base}, extra=extra))
    return upstream, base, proxy


@pytest_twisted.ensureDeferred
async def test_chat_completion_is_forwarded(reactor, upstreams, proxies, client) -> None:
    """A plain JSON chat completion comes back as the upstream sent it."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    response, body = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200
    document = json.loads(body)
    assert document["object"] == "chat.completion"
    assert document["choices"][0]["message"]["content"]
    assert header(response, "content-type") == "application/json"
    assert upstream.requests[-1].uri == b"/v1/chat/completions"


@pytest_twisted.ensureDeferred
async def test_first_sse_event_arrives_before_upstream_finishes(
    reactor, upstreams, proxies, client
) -> None:
    """Each SSE event reaches the client while the upstream is still sending."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    response = await send(
        client, reactor, proxy + "/v1/chat/completions", {**CHAT, "stream": True},
        headers={"X-Fake-Chunks": "4", "X-Fake-Chunk-Delay": "0.3"},
    )
    assert response.code == 200
    assert header(response, "content-type").startswith("text/event-stream")
    body = collect(response)
    first = await body.first.addTimeout(WAIT, reactor)
    assert first.startswith(b"data: ")
    # The upstream has more events to send, 0.3 s apart, when the first one
    # is already here.
    assert not upstream.requests[-1].done.called
    full = await body.done.addTimeout(WAIT, reactor)
    assert full.rstrip().endswith(b"data: [DONE]")
    assert await upstream.requests[-1].done == "finished"


@pytest_twisted.ensureDeferred
async def test_round_robin_over_three_upstreams(reactor, upstreams, proxies, client) -> None:
    """A model's URLs take turns, sequentially and across concurrent requests."""
    started = [await upstreams.start() for _ in range(3)]
    bases = [base for _, base in started]
    proxy = await proxies.start(
        config(target={"/v1/": bases[0]}, models={"rr-model": bases})
    )
    chat = {**CHAT, "model": "rr-model"}
    order = []
    for _ in range(6):
        await fetch(client, reactor, proxy + "/v1/chat/completions", chat)
        order.append([len(u.requests) for u, _ in started])
    assert order == [
        [1, 0, 0], [1, 1, 0], [1, 1, 1], [2, 1, 1], [2, 2, 1], [2, 2, 2],
    ]

    from twisted.internet.defer import gatherResults, ensureDeferred

    await gatherResults(
        [ensureDeferred(fetch(client, reactor, proxy + "/v1/chat/completions", chat))
         for _ in range(9)]
    ).addTimeout(WAIT, reactor)
    assert [len(u.requests) for u, _ in started] == [5, 5, 5]


@pytest_twisted.ensureDeferred
async def test_model_route_overrides_path_and_unknown_model_falls_back(
    reactor, upstreams, proxies, client
) -> None:
    """A known model goes to its own upstream; others use the path's."""
    (path_upstream, path_base), (model_upstream, model_base) = [
        await upstreams.start() for _ in range(2)
    ]
    proxy = await proxies.start(
        config(target={"/v1/": path_base}, models={"special": [model_base]})
    )
    await fetch(client, reactor, proxy + "/v1/chat/completions", {**CHAT, "model": "special"})
    await fetch(client, reactor, proxy + "/v1/chat/completions", {**CHAT, "model": "other"})
    assert len(model_upstream.requests) == 1
    assert len(path_upstream.requests) == 1


@pytest_twisted.ensureDeferred
async def test_body_and_query_are_forwarded_byte_for_byte(
    reactor, upstreams, proxies, client
) -> None:
    """The bytes forwarded are the bytes received, JSON or multipart."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    odd_json = b'{ "stream":false,\n  "model" : "fake-model", "x": "\\u00e9\xc3\xa9" , "n": 1.50 }'
    multipart = (
        b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
        b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        b"Content-Type: audio/wav\r\n\r\nRIFF\x00\x01\x02\xff\xfe\r\n--b--\r\n"
    )
    for body, content_type in ((odd_json, "application/json"),
                               (multipart, "multipart/form-data; boundary=b")):
        response, data = await fetch(
            client, reactor, proxy + "/echo/upload?a=1&b=%20x", body,
            headers={"Content-Type": content_type},
        )
        assert response.code == 200
        echoed = json.loads(data)
        assert echoed["body"].encode("latin-1") == body
        assert echoed["uri"] == "/echo/upload?a=1&b=%20x"
        assert echoed["method"] == "POST"


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_headers_dropped_both_ways(reactor, upstreams, proxies, client) -> None:
    """Connection-level headers stay on their hop; forwarding headers are set."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    response, data = await fetch(
        client, reactor, proxy + "/echo", b"{}", headers={
            "Connection": "X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "Upgrade": "h2c",
            "X-Forwarded-For": "203.0.113.9",
            "X-End-To-End": "kept",
            "Authorization": "Bearer client-key",
            "X-Fake-Response-Header": "Keep-Alive: timeout=1",
        },
    )
    seen = {name: value for name, value in json.loads(data)["headers"]}
    for dropped in ("x-secret-hop", "keep-alive", "te", "proxy-authorization",
                    "proxy-connection", "upgrade"):
        assert dropped not in seen, dropped
    assert seen["x-end-to-end"] == "kept"
    assert seen["authorization"] == "Bearer client-key"
    assert seen["host"] == base.split("//")[1]
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert header(response, "keep-alive") is None


@pytest_twisted.ensureDeferred
async def test_response_hop_by_hop_headers_dropped(reactor, upstreams, proxies) -> None:
    """The upstream's connection headers never reach the client."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    client = await raw_connect(
        reactor, proxy,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Fake-Response-Header: Keep-Alive: timeout=1\r\n"
        b"X-Fake-Response-Header: Upgrade: websocket\r\n"
        b"X-Fake-Response-Header: X-Upstream-End: yes\r\n\r\n",
    )
    await client.closed.addTimeout(WAIT, reactor)
    head = bytes(client.received).split(b"\r\n\r\n")[0].lower()
    assert b"x-upstream-end: yes" in head
    assert b"keep-alive: timeout=1" not in head
    assert b"upgrade:" not in head


@pytest_twisted.ensureDeferred
async def test_head_keeps_the_upstreams_content_length(
    reactor, raw_servers, proxies, client
) -> None:
    """A HEAD answer carries the length the upstream gave, and no body."""
    server, base = await raw_servers(answers_per_connection=100)
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    for _ in range(2):  # the kept-alive connection stays usable after a HEAD
        head, nothing = await fetch(client, reactor, proxy + "/v1/files/f1", method=b"HEAD")
        assert head.code == 200
        assert nothing == b""
        assert header(head, "content-length") == "1234"
    assert server.requests == [b"HEAD /v1/files/f1 HTTP/1.1"] * 2
    assert server.connections == 1


@pytest_twisted.ensureDeferred
async def test_client_disconnect_closes_upstream_within_a_second(
    reactor, upstreams, proxies
) -> None:
    """Nobody pays for tokens no one reads: the upstream is closed at once."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    body = json.dumps({**CHAT, "stream": True}).encode()
    client = await raw_connect(
        reactor, proxy,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Fake-Chunks: 100\r\nX-Fake-Chunk-Delay: 0.2\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    await client.wait_for(b"data: ").addTimeout(WAIT, reactor)
    seen = upstream.requests[-1]
    client.transport.abortConnection()
    assert await seen.done.addTimeout(1.0, reactor) == "disconnected"


@pytest_twisted.ensureDeferred
async def test_client_leaving_before_headers_cancels_upstream(
    reactor, upstreams, proxies
) -> None:
    """A client that gives up while the upstream thinks closes that request."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    arrived = upstream.next_request()
    client = await raw_connect(
        reactor, proxy,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Fake-Header-Delay: 30\r\n\r\n",
    )
    seen = await arrived.addTimeout(WAIT, reactor)
    client.transport.abortConnection()
    assert await seen.done.addTimeout(1.0, reactor) == "disconnected"


@pytest_twisted.ensureDeferred
async def test_slow_reader_pauses_the_upstream(reactor, upstreams, proxies) -> None:
    """A client that stops reading stalls the upstream: no proxy buffering.

    The upstream offers 64 MiB; while the client reads nothing, the upstream
    is paused with far less than that sent (what was sent sits in socket
    buffers, not in the proxy). When the client reads again, every byte
    arrives. (That it stays paused is test_time_limits' to show, on a fake
    clock.)
    """
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    size = 64 * 1024 * 1024
    arrived = upstream.next_request()
    client = await raw_connect(
        reactor, proxy,
        b"GET /v1/blob HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Fake-Body-Bytes: %d\r\nX-Fake-Content-Length: 1\r\n\r\n" % size,
    )
    client.transport.pauseProducing()
    seen = await arrived.addTimeout(WAIT, reactor)
    await seen.paused.addTimeout(WAIT, reactor)
    assert seen.bytes_sent < size // 2
    assert not seen.done.called

    client.transport.resumeProducing()
    await client.closed.addTimeout(WAIT * 3, reactor)
    head, _, payload = bytes(client.received).partition(b"\r\n\r\n")
    assert b"content-length: %d" % size in head.lower()
    assert len(payload) == size
    assert await seen.done == "finished"


@pytest_twisted.ensureDeferred
async def test_truncated_stream_gives_truncated_response(
    reactor, upstreams, proxies, client
) -> None:
    """An upstream dying mid-stream leaves the client without the final chunk."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    response = await send(
        client, reactor, proxy + "/v1/chat/completions", {**CHAT, "stream": True},
        headers={"X-Fake-Chunks": "5", "X-Fake-Abort-After": "2"},
    )
    assert response.code == 200
    body = collect(response)
    with pytest.raises(ResponseFailed):
        await body.done.addTimeout(WAIT, reactor)
    received = b"".join(body.chunks)
    assert received.startswith(b"data: ")
    assert b"[DONE]" not in received


@pytest_twisted.ensureDeferred
async def test_truncated_json_gives_truncated_response(reactor, upstreams, proxies) -> None:
    """A Content-Length body cut short upstream is cut short for the client."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    body = json.dumps(CHAT).encode()
    client = await raw_connect(
        reactor, proxy,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake-Abort-After: 1\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    await client.closed.addTimeout(WAIT, reactor)
    head, _, payload = bytes(client.received).partition(b"\r\n\r\n")
    declared = int(
        [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0]
        .split(b":")[1]
    )
    assert 0 < len(payload) < declared


async def closed_port(reactor: Any) -> int:
    """A loopback port nothing listens on."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    number = port.getHost().port
    await port.stopListening()
    return number


def assert_error(response: Any, data: bytes, status: int, code: str) -> dict:
    """Check an OpenAI-shaped JSON error and its request id."""
    assert response.code == status
    assert header(response, "content-type") == "application/json"
    error = json.loads(data)["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code
    assert error["request_id"] == header(response, "x-request-id")
    return error


@pytest_twisted.ensureDeferred
async def test_refused_upstream_is_502(reactor, proxies, client) -> None:
    """A refused connection is a 502 JSON error naming the upstream."""
    port = await closed_port(reactor)
    proxy = await proxies.start(config(target={"/v1/": f"http://127.0.0.1:{port}"}))
    response, data = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    error = assert_error(response, data, 502, "upstream_refused")
    assert f"127.0.0.1:{port}" in error["message"]


@pytest_twisted.ensureDeferred
async def test_unresolvable_upstream_is_502(reactor, proxies, client) -> None:
    """A host name that does not resolve is a 502 saying so."""
    proxy = await proxies.start(config(target={"/v1/": "http://no-such-host.test:9"}))
    response, data = await fetch(client, reactor, proxy + "/v1/models", method=b"GET")
    error = assert_error(response, data, 502, "upstream_dns_error")
    assert "resolve" in error["message"]
    assert proxies.resolver.lookups == ["no-such-host.test"]


@pytest_twisted.ensureDeferred
async def test_no_route_is_404(reactor, upstreams, proxies, client) -> None:
    """A path no target_map key matches is a 404 JSON error."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    response, data = await fetch(client, reactor, proxy + "/nowhere", CHAT)
    error = assert_error(response, data, 404, "route_not_found")
    assert "/nowhere" in error["message"]
    assert not upstream.requests


@pytest_twisted.ensureDeferred
async def test_upstream_errors_pass_through(reactor, upstreams, proxies, client) -> None:
    """An upstream's own error status and body reach the client unchanged."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    response, data = await fetch(
        client, reactor, proxy + "/v1/chat/completions", CHAT,
        headers={"X-Fake-Status": "429"},
    )
    assert response.code == 429
    assert "error" in json.loads(data)


@pytest_twisted.ensureDeferred
async def test_the_server_header_names_llmproxy_without_a_version(
    reactor, upstreams, proxies, client
) -> None:
    """Every answer says ``Server: llmproxy`` and no version: llmproxy's own
    answers, and proxied ones (the upstream's ``Server`` is not passed on)."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    for path, method, code in (
        ("/v1/chat/completions", b"POST", 200),
        ("/nowhere", b"POST", 404),
        ("/healthz", b"GET", 200),
    ):
        response, _ = await fetch(client, reactor, proxy + path, CHAT, method=method)
        assert response.code == code
        assert response.headers.getRawHeaders(b"server") == [b"llmproxy"], path
    assert upstream.requests, "the fake upstream answered the proxied one"


class _BrokenRouter:
    """A router with a bug: every lookup raises."""

    def route(self, path: bytes, model: str | None) -> Any:
        raise RuntimeError("a bug in routing")

    def pools(self) -> list[Any]:
        return []


@pytest.mark.allow_logged_failures
@pytest_twisted.ensureDeferred
async def test_a_bug_in_the_proxy_is_a_json_500_and_the_daemon_goes_on(
    reactor, upstreams, proxies, client, fail_on_logged_failures
) -> None:
    """An exception inside the proxy resource answers an OpenAI-shaped 500."""
    _, base = await upstreams.start()
    proxy = await proxies.start(f'target_map:\n  "/v1/": "{base}"\n')
    root = proxies.roots[-1]
    router, root.proxy.router = root.proxy.router, _BrokenRouter()
    response, body = await fetch(
        client, reactor, proxy + "/v1/chat/completions", CHAT,
        headers={"X-Request-ID": "bug-1"},
    )
    assert response.code == 500
    assert header(response, "content-type") == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "server_error"
    assert "Traceback" not in body.decode() and "a bug in routing" not in error["message"]
    assert header(response, "x-request-id") == "bug-1"
    assert [e["request_id"] for e in fail_on_logged_failures] == ["bug-1"]
    root.proxy.router = router
    response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    assert response.code == 200


def parse_raw(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Split an HTTP/1.0 response into lower-cased headers and body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
    return headers, body


@pytest.mark.parametrize(
    "given, expected",
    [
        (b"abc-123", "abc-123"),
        (b"  padded-id  ", "padded-id"),
        (b"x" * 128, "x" * 128),
        (b"x" * 129, None),
        (b"has space", None),
        (b"t\xc3\xa9st", None),
        (b"tab\tinside", None),
        (b"", None),
        (None, None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_request_id(reactor, upstreams, proxies, given, expected) -> None:
    """A sane client id is kept (trimmed), any other is replaced by a uuid4.

    Either way the upstream receives the same id the client gets back.
    """
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    line = b"" if given is None else b"X-Request-ID: " + given + b"\r\n"
    client = await raw_connect(
        reactor, proxy, b"GET /echo HTTP/1.0\r\nHost: x\r\n" + line + b"\r\n"
    )
    await client.closed.addTimeout(WAIT, reactor)
    headers, body = parse_raw(bytes(client.received))
    rid = headers["x-request-id"]
    if expected is not None:
        assert rid == expected
    else:
        assert uuid.UUID(rid).version == 4
    seen = dict(json.loads(body)["headers"])
    assert seen["x-request-id"] == rid


@pytest_twisted.ensureDeferred
async def test_errors_carry_the_request_id(reactor, proxies, client) -> None:
    """Error responses carry the client's request id in header and body."""
    port = await closed_port(reactor)
    proxy = await proxies.start(config(target={"/v1/": f"http://127.0.0.1:{port}"}))
    response, data = await fetch(
        client, reactor, proxy + "/v1/x", CHAT, headers={"X-Request-ID": "trace-7"}
    )
    assert header(response, "x-request-id") == "trace-7"
    assert json.loads(data)["error"]["request_id"] == "trace-7"


@pytest_twisted.ensureDeferred
async def test_health_endpoints(reactor, upstreams, proxies, client) -> None:
    """/healthz and /readyz answer locally, never upstream."""
    upstream, base, proxy = await one_proxy(upstreams, proxies)
    response, data = await fetch(client, reactor, proxy + "/healthz", method=b"GET")
    assert response.code == 200
    assert json.loads(data)["status"] == "ok"
    response, data = await fetch(client, reactor, proxy + "/readyz", method=b"GET")
    assert response.code == 200
    assert data == b"ready\n", "the public port says the word, nothing about upstreams"
    assert base.encode() not in data
    assert not upstream.requests


class _Hello(Resource):
    """Another resource of the embedding app."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello app"


@pytest_twisted.ensureDeferred
async def test_mounted_under_a_prefix_beside_another_resource(
    reactor, upstreams, client
) -> None:
    """An existing twisted.web app can putChild the proxy under /llm/."""
    upstream, base = await upstreams.start()
    cfg = parse_config_text(config(target={"/v1/": base}), environ={})
    gateway = Gateway(cfg, reactor)
    gateway.startService()
    llm = gateway.resource
    app = Resource()
    app.putChild(b"llm", llm)
    app.putChild(b"hello", _Hello())
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        build_site(cfg, reactor, app)
    )
    try:
        root = f"http://127.0.0.1:{port.getHost().port}"
        response, data = await fetch(client, reactor, root + "/llm/v1/chat/completions", CHAT)
        assert response.code == 200
        assert json.loads(data)["object"] == "chat.completion"
        assert upstream.requests[-1].uri == b"/v1/chat/completions"
        response, data = await fetch(client, reactor, root + "/hello", method=b"GET")
        assert data == b"hello app"
        response, data = await fetch(client, reactor, root + "/llm/healthz", method=b"GET")
        assert response.code == 200
    finally:
        await port.stopListening()
        await gateway.stopService()


def test_generated_request_ids_are_unique_and_differ_after_fork() -> None:
    """Generated ids are valid uuid4s, never repeat, and a forked worker
    does not hand out the ids its parent will (they come in batches)."""
    from llmproxy.proxy import request_id_for

    ids = [request_id_for(None) for _ in range(600)]
    assert len(set(ids)) == 600
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, request_id_for(None).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert uuid.UUID(child).version == 4
    assert child != request_id_for(None)
