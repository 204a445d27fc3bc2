"""Loopback tests of :mod:`llmproxy.testing.upstream`, the fake LLM upstream."""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from helpers import NeedleWaiter
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

import llmproxy.testing
from llmproxy.testing.upstream import (
    REPLY_TEXT,
    FakeUpstream,
    FakeUpstreamService,
    listen,
    make_site,
)

T = TypeVar("T")
Served = tuple[FakeUpstream, IListeningPort]
TIMEOUT = 15.0


@pytest_twisted.async_yield_fixture()
async def served(reactor: Any) -> AsyncIterator[Served]:
    """A fake upstream listening on 127.0.0.1, port 0."""
    upstream, port = await wait(reactor, listen(reactor))
    yield upstream, port
    await wait(reactor, port.stopListening())


@pytest_twisted.async_yield_fixture()
async def http(reactor: Any) -> AsyncIterator[HTTPClient]:
    """A treq client with its own non-persistent pool, closed afterwards."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    await wait(reactor, pool.closeCachedConnections())


def wait(reactor: IReactorTime, d: Deferred[T], seconds: float = TIMEOUT) -> Deferred[T]:
    """Give ``d`` a timeout, as every wait in these tests must have."""
    return d.addTimeout(seconds, reactor)


def base(served: Served) -> str:
    """The fake's base URL."""
    return f"http://127.0.0.1:{served[1].getHost().port}"


async def post(
    reactor: Any, http: HTTPClient, url: str, payload: object, **headers: str
) -> IResponse:
    """POST JSON with ``X-Fake-*`` style headers (underscores become dashes)."""
    sent = {name.replace("_", "-"): [value] for name, value in headers.items()}
    return await wait(reactor, http.post(url, json=payload, headers=sent))


def sse(body: bytes) -> list[tuple[str | None, str]]:
    """Split an SSE body into (event name, data) pairs."""
    events = []
    for block in body.decode().split("\n\n"):
        if block:
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((fields.get("event"), fields["data"]))
    return events


CHAT = {"model": "gpt-x", "messages": [{"role": "user", "content": "say hello to me"}]}


@pytest_twisted.ensureDeferred
async def test_chat_completion_json(reactor: Any, served: Served, http: HTTPClient) -> None:
    """A non-streamed chat completion is a valid, deterministic object."""
    upstream, _ = served
    response = await post(reactor, http, base(served) + "/v1/chat/completions", CHAT)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    body = await wait(reactor, response.json())
    assert body["object"] == "chat.completion" and body["model"] == "gpt-x"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": REPLY_TEXT,
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    record = upstream.requests[-1]
    assert (record.method, record.uri) == (b"POST", b"/v1/chat/completions")
    assert json.loads(record.body) == CHAT
    assert await wait(reactor, record.done) == "finished"


@pytest_twisted.ensureDeferred
async def test_chat_stream(reactor: Any, served: Served, http: HTTPClient) -> None:
    """A chat stream sends role, content pieces, stop, usage, then [DONE]."""
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = await post(
        reactor,
        http,
        base(served) + "/v1/chat/completions",
        payload,
        X_Fake_Chunks="3",
        X_Fake_Chunk_Delay="0.01",
    )
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert not response.headers.hasHeader("content-length")
    events = sse(await wait(reactor, response.content()))
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:4]]
    assert len(pieces) == 3 and "".join(pieces) == REPLY_TEXT
    assert chunks[4]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 6
    assert len(chunks) == 6


@pytest_twisted.ensureDeferred
async def test_anthropic_stream_order(reactor: Any, served: Served, http: HTTPClient) -> None:
    """An Anthropic stream follows the documented event sequence."""
    payload = {"model": "claude-x", "max_tokens": 10, "stream": True, "messages": CHAT["messages"]}
    response = await post(reactor, http, base(served) + "/v1/messages", payload, X_Fake_Chunks="2")
    events = sse(await wait(reactor, response.content()))
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    datas = [json.loads(data) for _, data in events]
    assert [d["type"] for d in datas] == names
    assert datas[0]["message"]["model"] == "claude-x"
    assert "".join(d["delta"]["text"] for d in datas[3:5]) == REPLY_TEXT
    assert datas[6]["delta"]["stop_reason"] == "end_turn"


RESPONSES = {"model": "gpt-x", "input": "say hello to me", "instructions": "be brief"}

#: The event types of a Responses API stream of two text pieces, in order.
RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest_twisted.ensureDeferred
async def test_responses_json(reactor: Any, served: Served, http: HTTPClient) -> None:
    """``POST /v1/responses`` answers a completed Responses API object."""
    response = await post(reactor, http, base(served) + "/v1/responses", RESPONSES)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    body = await wait(reactor, response.json())
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert (body["status"], body["model"]) == ("completed", "gpt-x")
    (item,) = body["output"]
    assert item["type"] == "message" and item["id"].startswith("msg_")
    assert (item["status"], item["role"]) == ("completed", "assistant")
    assert item["content"] == [{"type": "output_text", "text": REPLY_TEXT, "annotations": []}]
    assert body["usage"] == {
        "input_tokens": 6,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 12,
    }
    assert await wait(reactor, served[0].requests[-1].done) == "finished"


@pytest_twisted.ensureDeferred
async def test_responses_stream(reactor: Any, served: Served, http: HTTPClient) -> None:
    """A Responses stream follows the documented event sequence, numbered,
    and ends with the whole response and its usage."""
    response = await post(
        reactor,
        http,
        base(served) + "/v1/responses",
        {**RESPONSES, "stream": True},
        X_Fake_Chunks="2",
        X_Fake_Chunk_Delay="0.01",
    )
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    events = sse(await wait(reactor, response.content()))
    assert [name for name, _ in events] == RESPONSE_EVENTS
    datas = [json.loads(data) for _, data in events]
    assert [d["type"] for d in datas] == RESPONSE_EVENTS
    assert [d["sequence_number"] for d in datas] == list(range(len(RESPONSE_EVENTS)))
    assert datas[0]["response"]["status"] == "in_progress"
    assert datas[0]["response"]["usage"] is None
    assert "".join(d["delta"] for d in datas[4:6]) == REPLY_TEXT
    assert datas[6]["text"] == REPLY_TEXT
    done = datas[-1]["response"]
    assert done["status"] == "completed" and done["output"] == [datas[8]["item"]]
    assert done["output"][0]["content"][0]["text"] == REPLY_TEXT
    assert done["usage"]["input_tokens"] == 6 and done["usage"]["total_tokens"] == 12


@pytest_twisted.ensureDeferred
async def test_responses_stream_abort(reactor: Any, served: Served, http: HTTPClient) -> None:
    """X-Fake-Abort-After cuts a Responses stream after N text pieces."""
    received: list[bytes] = []
    payload = {**RESPONSES, "stream": True}
    url = base(served) + "/v1/responses"
    response = await post(reactor, http, url, payload, X_Fake_Abort_After="1")
    with pytest.raises((ResponseFailed, PotentialDataLoss)):
        await wait(reactor, treq.collect(response, received.append))
    assert [name for name, _ in sse(b"".join(received))] == RESPONSE_EVENTS[:5]
    assert await wait(reactor, served[0].requests[-1].done) == "aborted"


@pytest_twisted.ensureDeferred
async def test_echo(reactor: Any, served: Served, http: HTTPClient) -> None:
    """``/echo`` reflects the method, URI, raw headers and body."""
    url = base(served) + "/echo/x?y=1"
    d = http.put(url, data=b"\xffbody", headers={"X-Thing": ["a", "b"]})
    response = await wait(reactor, d)
    body = await wait(reactor, response.json())
    assert (body["method"], body["uri"], body["body"]) == ("PUT", "/echo/x?y=1", "\xffbody")
    assert ["x-thing", "a"] in body["headers"] and ["x-thing", "b"] in body["headers"]


@pytest_twisted.ensureDeferred
async def test_status_and_errors(reactor: Any, served: Served, http: HTTPClient) -> None:
    """X-Fake-Status, bad controls and unknown routes give JSON errors."""
    url = base(served) + "/v1/chat/completions"
    response = await post(reactor, http, url, CHAT, X_Fake_Status="503")
    assert response.code == 503
    assert set((await wait(reactor, response.json()))["error"]) == {"message", "type", "code"}
    response = await post(reactor, http, url, CHAT, X_Fake_Status="201")
    assert response.code == 201
    assert (await wait(reactor, response.json()))["object"] == "chat.completion"
    response = await post(reactor, http, url, CHAT, X_Fake_Chunks="many")
    assert response.code == 400
    assert "x-fake-chunks" in (await wait(reactor, response.json()))["error"]["message"]
    response = await post(
        reactor, http, base(served) + "/v2/nothing", {}, X_Fake_Response_Header="X-Extra: yes"
    )
    assert response.code == 404 and response.headers.getRawHeaders("x-extra") == ["yes"]
    assert (await wait(reactor, response.json()))["error"]["code"] == "unknown_url"


@pytest_twisted.ensureDeferred
async def test_abort_after(reactor: Any, served: Served, http: HTTPClient) -> None:
    """X-Fake-Abort-After truncates JSON and streams; ``done`` says aborted."""
    upstream, _ = served
    url = base(served) + "/v1/chat/completions"
    response = await post(reactor, http, url, CHAT, X_Fake_Abort_After="1")
    with pytest.raises((ResponseFailed, PotentialDataLoss)):
        await wait(reactor, response.content())
    assert await wait(reactor, upstream.requests[-1].done) == "aborted"

    received: list[bytes] = []
    stream = {**CHAT, "stream": True}
    response = await post(reactor, http, url, stream, X_Fake_Abort_After="2")
    with pytest.raises((ResponseFailed, PotentialDataLoss)):
        await wait(reactor, treq.collect(response, received.append))
    events = sse(b"".join(received))
    assert len(events) == 3 and b"[DONE]" not in b"".join(received)
    assert await wait(reactor, upstream.requests[-1].done) == "aborted"


@pytest_twisted.ensureDeferred
async def test_header_delay_disconnect(reactor: Any, served: Served, http: HTTPClient) -> None:
    """A client leaving during X-Fake-Header-Delay fires ``done`` "disconnected"."""
    upstream, _ = served
    arrived = wait(reactor, upstream.next_request())
    d = http.get(base(served) + "/v1/models", headers={"X-Fake-Header-Delay": ["30"]})
    record = await arrived
    d.cancel()
    with pytest.raises(ResponseNeverReceived):
        await d
    assert await wait(reactor, record.done) == "disconnected"


@pytest_twisted.ensureDeferred
async def test_body_bytes(reactor: Any, served: Served, http: HTTPClient) -> None:
    """X-Fake-Body-Bytes returns exactly N pattern bytes, chunked or not."""
    size = 300_005
    for length in ("0", "1"):
        headers = {"X-Fake-Body-Bytes": [str(size)], "X-Fake-Content-Length": [length]}
        response = await wait(reactor, http.get(base(served) + "/v1/models", headers=headers))
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type") == ["application/octet-stream"]
        assert response.length == (size if length == "1" else UNKNOWN_LENGTH)
        body = await wait(reactor, response.content())
        assert body == (bytes(range(256)) * (size // 256 + 1))[:size]
        assert served[0].requests[-1].bytes_sent == size


class _SlowReader(Protocol):
    """A raw HTTP client that stops reading until told to go on."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = 0
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        """Send the request, then stop reading."""
        self.transport.write(self.request)
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        """Count the bytes."""
        self.received += len(data)

    def connectionLost(self, reason: Failure) -> None:
        """Fire ``lost``."""
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_body_bytes_backpressure(reactor: Any, served: Served) -> None:
    """Over a real socket, a client that stops reading pauses the body
    producer early; the whole body arrives once it reads again.

    That the producer then stays paused is checked deterministically by
    :func:`test_body_bytes_backpressure_in_memory`.
    """
    upstream, port = served
    size = 64 * 1024 * 1024
    request = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Fake-Body-Bytes: %d\r\n\r\n"
    reader = _SlowReader(request % size)
    arrived = wait(reactor, upstream.next_request())
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=5)
    await wait(reactor, connectProtocol(endpoint, reader))
    record = await arrived
    await wait(reactor, record.paused)
    # Socket buffers take a few MB, then the transport pushes back.
    assert record.bytes_sent < size // 2
    reader.transport.resumeProducing()
    await wait(reactor, reader.lost, 60)
    assert await wait(reactor, record.done) == "finished"
    assert record.bytes_sent == size and reader.received > size


class _FillingTransport(StringTransport):
    """A StringTransport with a send buffer that fills up.

    Past ``limit`` buffered bytes it pauses its producer, as a real
    transport does when its send buffer is full; :meth:`drain` empties the
    buffer (the peer read it all) and resumes the producer. Everything
    written stays in :meth:`value`.

    Attributes:
        limit: The buffered bytes at which the producer is paused.
        buffered: Bytes written since the last drain.
        full: Whether the producer is paused for a full buffer.
    """

    def __init__(self, limit: int) -> None:
        """Start empty.

        Args:
            limit: The buffered bytes at which the producer is paused.
        """
        super().__init__()
        self.limit = limit
        self.buffered = 0
        self.full = False

    def write(self, data: bytes) -> None:
        """Buffer ``data``; pause the producer once the buffer is full.

        Args:
            data: The bytes.
        """
        super().write(data)
        self.buffered += len(data)
        if not self.full and self.buffered >= self.limit and self.producer is not None:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The peer read everything: resume the producer."""
        self.buffered = 0
        if self.full:
            self.full = False
            self.producer.resumeProducing()


def test_body_bytes_backpressure_in_memory() -> None:
    """Once the transport stops taking bytes, the body producer is paused
    and writes nothing, however much time passes, until it is resumed.

    The fake's site runs on a Clock and a transport whose send buffer
    fills: it pushes back by pausing the producer registered with it (the
    HTTP channel), which must pause the body producer.
    """
    clock = Clock()
    upstream = FakeUpstream(clock)
    protocol = make_site(clock, upstream).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = _FillingTransport(limit=300_000)
    protocol.makeConnection(transport)
    size = 5 * 1024 * 1024 + 7
    protocol.dataReceived(
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Fake-Content-Length: 1\r\nX-Fake-Body-Bytes: %d\r\n\r\n" % size
    )
    (record,) = upstream.requests
    clock.advance(0)
    assert transport.full and record.paused.called
    sent, written = record.bytes_sent, len(transport.value())
    assert 300_000 <= sent < 400_000
    for _ in range(20):
        clock.advance(0.5)
        assert (record.bytes_sent, len(transport.value())) == (sent, written)
    assert not record.done.called

    transport.limit = size * 2
    transport.drain()
    assert len(transport.value()) == written, "resumed from the next reactor turn"
    clock.advance(0)
    outcomes: list[str] = []
    record.done.addCallback(outcomes.append)
    assert outcomes == ["finished"]
    assert record.bytes_sent == size
    head, body = transport.value().split(b"\r\n\r\n", 1)
    assert b"\r\ncontent-length: %d" % size in head.lower()
    assert body == (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest_twisted.ensureDeferred
async def test_service(reactor: Any, http: HTTPClient) -> None:
    """FakeUpstreamService listens while running and stops on stopService."""
    service = FakeUpstreamService(reactor)
    service.startService()
    assert service.port is not None
    url = f"http://127.0.0.1:{service.port.getHost().port}/v1/models"
    response = await wait(reactor, http.get(url))
    assert (await wait(reactor, response.json()))["data"][0]["id"] == "fake-model"
    assert await wait(reactor, service.upstream.requests[-1].done) == "finished"
    await wait(reactor, service.stopService())
    assert service.port is None and not service.running


def _openai_client(port: int) -> Any:
    """An official openai SDK client for ``port``, without retries or proxies."""
    import openai

    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="test",
        max_retries=0,
        timeout=10,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


def _openai_calls(port: int) -> dict[str, Any]:
    """Use the official openai SDK against the fake (runs in a thread)."""
    with _openai_client(port) as client:
        messages: Any = CHAT["messages"]
        completion = client.chat.completions.create(model="gpt-x", messages=messages)
        stream = client.chat.completions.create(
            model="gpt-x",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Fake-Chunks": "4"},
        )
        chunks = list(stream)
        default = client.embeddings.create(model="emb", input=["one", "two words"])
        floats = client.embeddings.create(model="emb", input="one", encoding_format="float")
    return {"completion": completion, "chunks": chunks, "default": default, "floats": floats}


@pytest_twisted.async_fixture(params=["direct", "through-llmproxy"])
async def sdk_port(request: Any, served: Served, proxies: Any) -> int:
    """The port the SDKs talk to: the fake itself, or llmproxy in front of it."""
    port = served[1].getHost().port
    if request.param == "direct":
        return port
    proxy = await proxies.start(f'target_map: {{"/v1/": "http://127.0.0.1:{port}"}}\n')
    return int(proxy.rsplit(":", 1)[1])


@pytest_twisted.ensureDeferred
async def test_openai_sdk(reactor: Any, served: Served, sdk_port: int) -> None:
    """The openai SDK parses chat completions, streams and embeddings.

    Directly from the fake, and with base_url pointed at llmproxy.
    """
    result = await wait(reactor, deferToThread(_openai_calls, sdk_port), 60)
    completion = result["completion"]
    assert completion.choices[0].message.content == REPLY_TEXT
    assert completion.model == "gpt-x" and completion.usage.total_tokens > 0
    chunks = result["chunks"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    default, floats = result["default"], result["floats"]
    assert [e.index for e in default.data] == [0, 1]
    assert all(len(e.embedding) == 8 for e in default.data)
    assert default.data[0].embedding == floats.data[0].embedding
    assert default.data[0].embedding != default.data[1].embedding
    assert json.loads(served[0].requests[-2].body)["encoding_format"] == "base64"


def _anthropic_calls(port: int) -> dict[str, Any]:
    """Use the official anthropic SDK against the fake (runs in a thread)."""
    import anthropic

    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}",
        api_key="test",
        max_retries=0,
        timeout=10,
        http_client=anthropic.DefaultHttpxClient(trust_env=False),
    )
    with client:
        messages: Any = CHAT["messages"]
        message = client.messages.create(model="claude-x", max_tokens=64, messages=messages)
        with client.messages.stream(
            model="claude-x",
            max_tokens=64,
            messages=messages,
            extra_headers={"X-Fake-Chunks": "3"},
        ) as stream:
            texts = list(stream.text_stream)
            final = stream.get_final_message()
    return {"message": message, "texts": texts, "final": final}


@pytest_twisted.ensureDeferred
async def test_anthropic_sdk(reactor: Any, served: Served, sdk_port: int) -> None:
    """The anthropic SDK parses messages, plain and streamed.

    Directly from the fake, and with base_url pointed at llmproxy.
    """
    result = await wait(reactor, deferToThread(_anthropic_calls, sdk_port), 60)
    message = result["message"]
    assert message.content[0].text == REPLY_TEXT and message.stop_reason == "end_turn"
    assert message.model == "claude-x" and message.usage.input_tokens == 4
    assert len(result["texts"]) == 3 and "".join(result["texts"]) == REPLY_TEXT
    final = result["final"]
    assert final.content[0].text == REPLY_TEXT and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 6


def _openai_responses_calls(port: int) -> dict[str, Any]:
    """Use the openai SDK's Responses API against ``port`` (runs in a thread)."""
    with _openai_client(port) as client:
        response = client.responses.create(model="gpt-x", input="say hello to me")
        with client.responses.create(
            model="gpt-x",
            input="say hello to me",
            stream=True,
            extra_headers={"X-Fake-Chunks": "4"},
        ) as stream:
            events = list(stream)
    return {"response": response, "events": events}


@pytest_twisted.ensureDeferred
async def test_openai_sdk_responses(reactor: Any, served: Served, sdk_port: int) -> None:
    """The openai SDK's ``responses.create`` works, plain and streamed.

    Directly from the fake, and with base_url pointed at llmproxy.
    """
    from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent

    result = await wait(reactor, deferToThread(_openai_responses_calls, sdk_port), 60)
    response = result["response"]
    assert response.output_text == REPLY_TEXT
    assert (response.status, response.model) == ("completed", "gpt-x")
    assert response.usage.input_tokens == 4 and response.usage.total_tokens == 10
    events = result["events"]
    deltas = [e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)]
    assert len(deltas) == 4 and "".join(deltas) == REPLY_TEXT
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.output_text == REPLY_TEXT
    assert completed.response.usage.output_tokens == 6
    assert [json.loads(r.body).get("stream") for r in served[0].requests] == [None, True]


@pytest_twisted.ensureDeferred
async def test_responses_usage_through_llmproxy(
    reactor: Any, served: Served, proxies: Any, access: Any, http: HTTPClient
) -> None:
    """llmproxy's access records carry a Responses API reply's token counts
    and model, from a JSON body and from a stream's ``response.completed``."""
    port = served[1].getHost().port
    proxy = await proxies.start(f'target_map: {{"/v1/": "http://127.0.0.1:{port}"}}\n')
    for payload in (RESPONSES, {**RESPONSES, "stream": True}):
        response = await post(reactor, http, proxy + "/v1/responses", payload)
        assert response.code == 200
        await wait(reactor, response.content())
    await wait(reactor, access.wait(2))
    for record, streamed in zip(access, (False, True)):
        assert record["path"] == "/v1/responses" and record["stream"] is streamed
        assert record["upstream_model"] == "gpt-x"
        assert (record["prompt_tokens"], record["completion_tokens"]) == (6, 6)
        assert (record["total_tokens"], record["cached_tokens"]) == (12, 0)


@pytest_twisted.ensureDeferred
async def test_runs_standalone(reactor: Any, tmp_path: Any, http: HTTPClient) -> None:
    """`python -m llmproxy.testing.upstream --port 0` serves until SIGTERM."""
    class Child(ProcessProtocol, NeedleWaiter):
        def __init__(self) -> None:
            NeedleWaiter.__init__(self)
            self.ended: Deferred[None] = Deferred()

        def outReceived(self, data: bytes) -> None:
            self.feed(data)

        errReceived = outReceived

        def processEnded(self, reason: Any) -> None:
            self.fail_waits(AssertionError(bytes(self.received).decode()))
            self.ended.callback(None)

    # A log line is one write to the pipe: it arrives whole.
    child = Child()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    reactor.spawnProcess(
        child, sys.executable,
        [sys.executable, "-m", "llmproxy.testing.upstream", "--port", "0"],
        env=env, path=str(tmp_path),
    )
    try:
        await wait(reactor, child.wait_for(b"fake upstream on 127.0.0.1:"))
        port = int(re.search(rb"fake upstream on 127\.0\.0\.1:(\d+)", bytes(child.received))[1])
        response = await wait(reactor, http.get(f"http://127.0.0.1:{port}/v1/models"))
        assert response.code == 200
        assert json.loads(await wait(reactor, response.content()))["data"][0]["id"] == "fake-model"
    finally:
        if not child.ended.called:
            child.transport.signalProcess("TERM")
        await wait(reactor, child.ended)


def _package_imports() -> dict[str, list[tuple[str, str | None, int]]]:
    """Every import between the modules of :mod:`llmproxy.testing`.

    Imports inside functions and under ``TYPE_CHECKING`` count too.

    Returns:
        Each module's dotted name mapped to (imported module, imported name or
        None, line): ``from llmproxy.testing import _sse`` imports the module
        ``llmproxy.testing._sse``; ``from llmproxy.testing._sse import
        Events`` imports the name ``Events`` of ``llmproxy.testing._sse``.
    """
    package = llmproxy.testing.__name__
    folder = Path(llmproxy.testing.__file__).parent
    paths: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.py")):
        parts = [package, *path.relative_to(folder).with_suffix("").parts]
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found: dict[str, list[tuple[str, str | None, int]]] = {}
    for module, path in paths.items():
        edges = found.setdefault(module, [])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(a.name, None, node.lineno) for a in node.names if a.name in paths]
            elif isinstance(node, ast.ImportFrom) and node.module in paths:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in paths:
                        edges.append((f"{node.module}.{alias.name}", None, node.lineno))
                    else:
                        edges.append((node.module, alias.name, node.lineno))
    return found


def test_testing_package_has_no_import_cycle() -> None:
    """The modules of llmproxy.testing import each other one way only."""
    imports = _package_imports()
    assert imports["llmproxy.testing._exchange"], "the walk found no imports at all"
    graph = {module: {target for target, _, _ in edges} for module, edges in imports.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module not in done:
            for target in sorted(graph.get(module, ())):
                visit(target, path + [module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_testing_package_private_names_stay_home() -> None:
    """No module of llmproxy.testing imports another's ``_``-prefixed name,
    nor a ``_module`` of a package it is not in."""
    crossing = []
    for module, edges in _package_imports().items():
        for target, name, line in edges:
            home = target.rpartition(".")[0]
            if name is not None and name.startswith("_"):
                crossing.append(f"{module}:{line} imports {target}.{name}")
            elif target.rpartition(".")[2].startswith("_") and not (
                module == home or module.startswith(home + ".")
            ):
                crossing.append(f"{module}:{line} imports {target} from outside {home}")
    assert crossing == []
