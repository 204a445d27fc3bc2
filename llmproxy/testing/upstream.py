"""An OpenAI/Anthropic-compatible fake upstream for tests, benchmarks and demos.

See :class:`FakeUpstream` for the routes and the ``X-Fake-*`` control headers.
Run it standalone with ``python -m llmproxy.testing.upstream --port 9001``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import json
import math
import re
import struct
import sys
from typing import Any
from collections.abc import Callable

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer, IReactorTime
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

__all__ = ["FakeUpstream", "FakeUpstreamService", "UpstreamRequest", "listen", "main", "make_site"]

log = Logger()

DEFAULT_MODEL = "fake-model"
REPLY_TEXT = "Hello from the llmproxy fake upstream."
EMBEDDING_DIMENSIONS = 8

_CHUNK = 64 * 1024
_PATTERN = bytes(range(256)) * (_CHUNK // 256)
_CHUNKS_PER_TURN = 16
_MAX_CHUNKS = 100_000
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_Events = list[tuple[bytes, bool]]  # (an SSE event, whether it is a content piece)


@attrs.define(eq=False)
class UpstreamRequest:
    """One request received by a :class:`FakeUpstream`.

    Attributes:
        method: The request method.
        uri: Path and query as received.
        headers: A copy of the request headers.
        body: The request body.
        done: Fires with ``"finished"`` once the response was fully written,
            ``"disconnected"`` if the peer went away first, or ``"aborted"``
            when the fake aborted the connection itself. Never fails.
        bytes_sent: Body bytes written so far by ``X-Fake-Body-Bytes``.
        paused: Fires the first time the body producer is paused by the
            transport (backpressure); never fires otherwise.
    """

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    done: Deferred[str] = attrs.field(factory=Deferred)
    bytes_sent: int = 0
    paused: Deferred[None] = attrs.field(factory=Deferred)


class _BadRequest(Exception):
    """A control header or the JSON body is invalid: answered with a 400."""


@attrs.frozen
class _Controls:
    """The parsed ``X-Fake-*`` request headers."""

    status: int = 200
    chunks: int = 5
    chunk_delay: float = 0.0
    header_delay: float = 0.0
    abort_after: int | None = None
    body_bytes: int | None = None
    content_length: bool = False
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def parse(cls, headers: Headers) -> _Controls:
        """Parse the control headers; raise :class:`_BadRequest` if invalid."""

        def last(name: bytes) -> str | None:
            values = headers.getRawHeaders(name)
            return values[-1].decode("latin-1").strip() if values else None

        def integer(name: bytes, low: int, high: int) -> int | None:
            raw = last(name)
            if raw is None:
                return None
            if not (re.fullmatch("[0-9]{1,19}", raw) and low <= int(raw) <= high):
                raise _BadRequest(f"{name.decode()}: an integer in [{low}, {high}]")
            return int(raw)

        def seconds(name: bytes) -> float:
            try:
                value = float(last(name) or "0")
            except ValueError:
                value = math.nan
            if not 0 <= value <= 86400:
                raise _BadRequest(f"{name.decode()}: a number of seconds")
            return value

        extra = []
        for raw in headers.getRawHeaders(b"x-fake-response-header", []):
            name, colon, value = raw.partition(b":")
            if not colon or not _TOKEN.fullmatch(name.strip()):
                raise _BadRequest("x-fake-response-header: 'Name: value'")
            extra.append((name.strip(), value.strip()))
        if (flag := last(b"x-fake-content-length")) not in (None, "0", "1"):
            raise _BadRequest("x-fake-content-length: 0 or 1")
        return cls(
            status=integer(b"x-fake-status", 200, 599) or 200,
            chunks=integer(b"x-fake-chunks", 1, _MAX_CHUNKS) or 5,
            chunk_delay=seconds(b"x-fake-chunk-delay"),
            header_delay=seconds(b"x-fake-header-delay"),
            abort_after=integer(b"x-fake-abort-after", 0, _MAX_CHUNKS),
            body_bytes=integer(b"x-fake-body-bytes", 0, 2**62),
            content_length=flag == "1",
            extra_headers=tuple(extra),
        )


def _error(message: str, kind: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def _split_reply(pieces: int) -> list[str]:
    """Split :data:`REPLY_TEXT` into ``pieces`` roughly equal word pieces."""
    words = re.findall(r"\S+\s*", REPLY_TEXT)
    units = words if pieces <= len(words) else list(REPLY_TEXT)
    n = len(units)
    return ["".join(units[i * n // pieces : (i + 1) * n // pieces]) for i in range(pieces)]


def _words(value: object) -> int:
    """Count the words in strings, lists, messages and text parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("content")) + _words(value.get("text"))
    return 0


def _embedding(item: object) -> list[float]:
    """A deterministic vector whose values are exact in float32."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    values = struct.unpack(f"<{EMBEDDING_DIMENSIONS}H", digest[: 2 * EMBEDDING_DIMENSIONS])
    return [value / 32768 - 1 for value in values]


def _sse(data: object, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data)}\n\n".encode()


def _model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    return model if isinstance(model, str) and model else DEFAULT_MODEL


@implementer(IPushProducer)
class _PatternProducer:
    """Writes the ``X-Fake-Body-Bytes`` pattern in 64 KiB chunks while resumed."""

    def __init__(self, exchange: _Exchange, stop_at: int, on_end: Callable[[], None]) -> None:
        self._reactor, self._request = exchange.reactor, exchange.request
        self._record, self._stop_at, self._on_end = exchange.record, stop_at, on_end
        self._paused = self._stopped = False
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        """Register with the request as a streaming producer and start."""
        self._request.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not (self._paused or self._stopped):
            self._call = self._reactor.callLater(0, self._produce)

    def _produce(self) -> None:
        self._call = None
        for _ in range(_CHUNKS_PER_TURN):
            left = self._stop_at - self._record.bytes_sent
            if self._paused or self._stopped or left <= 0:
                break
            self._record.bytes_sent += min(left, _CHUNK)
            self._request.write(_PATTERN[: min(left, _CHUNK)])
        else:
            self._schedule()  # let the reactor breathe, then go on
        if not self._stopped and self._record.bytes_sent >= self._stop_at:
            self.stopProducing()
            self._request.unregisterProducer()
            self._on_end()

    def pauseProducing(self) -> None:
        """Stop writing until resumed; fire ``paused`` the first time."""
        self._paused = True
        if not (self._stopped or self._record.paused.called):
            self._record.paused.callback(None)

    def resumeProducing(self) -> None:
        """Go on writing from the next reactor turn."""
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        """Stop for good."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _Exchange:
    """One response: controls, timers, streaming, abort and outcome."""

    def __init__(self, upstream: FakeUpstream, request: Request, record: UpstreamRequest) -> None:
        self.upstream, self.reactor = upstream, upstream.reactor
        self.request, self.record = request, record
        self._controls = _Controls()
        self._timer: IDelayedCall | None = None
        self._producer: _PatternProducer | None = None
        request.notifyFinish().addCallbacks(
            lambda _: self._settle("finished"), lambda _: self._settle("disconnected")
        )

    def start(self) -> None:
        """Parse the controls, then respond now or after the header delay."""
        try:
            self._controls = _Controls.parse(self.request.requestHeaders)
        except _BadRequest as e:
            error = _error(str(e), "invalid_request_error", "bad_fake_control")
            self._send_json(error, 400, abortable=False)
            return
        if self._controls.header_delay > 0:
            self._timer = self.reactor.callLater(self._controls.header_delay, self._respond)
        else:
            self._respond()

    def _settle(self, outcome: str) -> None:
        """Fire ``done`` once, stopping whatever is pending."""
        if self.record.done.called:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._producer is not None:
            self._producer.stopProducing()
        log.debug(
            "fake upstream {method} {path}: {outcome}",
            method=self.record.method.decode("latin-1"),
            path=self.request.path.decode("latin-1"),
            outcome=outcome,
        )
        self.record.done.callback(outcome)

    def _abort(self) -> None:
        """Settle as aborted; abort once the written data has reached the socket.

        ``abortConnection`` drops the transport's write buffer, which is
        flushed into the socket within one reactor turn.
        """
        self._settle("aborted")
        transport = self.request.transport
        self.reactor.callLater(0, self.reactor.callLater, 0, transport.abortConnection)

    def _respond(self) -> None:
        status = self._controls.status
        self.request.setResponseCode(status)
        for name, value in self._controls.extra_headers:
            self.request.responseHeaders.addRawHeader(name, value)
        if not 200 <= status < 300:
            self._send_json(_error(f"fake error {status}", "fake_error", f"http_{status}"))
        elif self._controls.body_bytes is not None:
            self._send_pattern(self._controls.body_bytes)
        else:
            try:
                self._route(self.record.method, self.request.path)
            except _BadRequest as e:
                error = _error(str(e), "invalid_request_error", "bad_body")
                self._send_json(error, 400, abortable=False)

    def _route(self, method: bytes, path: bytes) -> None:
        api = {
            b"/v1/chat/completions": self._chat,
            b"/v1/embeddings": self._embeddings,
            b"/v1/messages": self._messages,
        }
        if method == b"POST" and path in api:
            try:
                payload = json.loads(self.record.body)
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                raise _BadRequest("the request body is not a JSON object")
            api[path](payload)
        elif method == b"GET" and path == b"/v1/models":
            model = {"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "llmproxy"}
            self._send_json({"object": "list", "data": [model]})
        elif path == b"/echo" or path.startswith(b"/echo/"):
            self._send_json(self._echo())
        else:
            message = f"no route for {method.decode('latin-1')} {path.decode('latin-1')}"
            self._send_json(_error(message, "invalid_request_error", "unknown_url"), 404)

    def _echo(self) -> dict[str, Any]:
        def text(raw: bytes) -> str:
            return raw.decode("latin-1")

        record = self.record
        headers = [
            [text(name).lower(), text(value)]
            for name, values in record.headers.getAllRawHeaders()
            for value in values
        ]
        echo = {"method": text(record.method), "uri": text(record.uri), "headers": headers}
        return {**echo, "body": text(record.body)}

    def _chat(self, payload: dict[str, Any]) -> None:
        ident = f"chatcmpl-fake{len(self.upstream.requests):06d}"
        base = {"id": ident, "object": "chat.completion", "created": int(self.reactor.seconds())}
        base["model"] = _model(payload)
        prompt, output = max(1, _words(payload.get("messages"))), len(REPLY_TEXT.split())
        usage = {"prompt_tokens": prompt, "completion_tokens": output}
        usage["total_tokens"] = prompt + output
        if not payload.get("stream"):
            message = {"role": "assistant", "content": REPLY_TEXT, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            self._send_json({**base, "choices": [choice], "usage": usage})
            return
        base["object"] = "chat.completion.chunk"

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice]})

        events = [(chunk({"role": "assistant", "content": ""}), False)]
        pieces = _split_reply(self._controls.chunks)
        events += [(chunk({"content": piece}), True) for piece in pieces]
        events.append((chunk({}, "stop"), False))
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            events.append((_sse({**base, "choices": [], "usage": usage}), False))
        self._stream(events + [(b"data: [DONE]\n\n", False)])

    def _embeddings(self, payload: dict[str, Any]) -> None:
        raw = payload.get("input", "")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        data = []
        for index, item in enumerate(inputs):
            vector: Any = _embedding(item)
            if payload.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = max(1, sum(_words(i) if isinstance(i, str) else 1 for i in inputs))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._send_json({"object": "list", "data": data, "model": _model(payload), "usage": usage})

    def _messages(self, payload: dict[str, Any]) -> None:
        prompt = max(1, _words(payload.get("messages")) + _words(payload.get("system")))
        output = len(REPLY_TEXT.split())
        message = {
            "id": f"msg_fake{len(self.upstream.requests):06d}",
            "type": "message",
            "role": "assistant",
            "model": _model(payload),
            "content": [{"type": "text", "text": REPLY_TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": output},
        }
        if not payload.get("stream"):
            self._send_json(message)
            return
        usage = {"input_tokens": prompt, "output_tokens": 1}
        start = {**message, "content": [], "stop_reason": None, "usage": usage}
        sequence: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"message": start}),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ("ping", {}),
        ]
        for text in _split_reply(self._controls.chunks):
            delta = {"type": "text_delta", "text": text}
            sequence.append(("content_block_delta", {"index": 0, "delta": delta}))
        stop = {"stop_reason": "end_turn", "stop_sequence": None}
        sequence.append(("content_block_stop", {"index": 0}))
        sequence.append(("message_delta", {"delta": stop, "usage": {"output_tokens": output}}))
        sequence.append(("message_stop", {}))
        piece = "content_block_delta"
        self._stream([(_sse({"type": n, **data}, n), n == piece) for n, data in sequence])

    def _send_json(self, obj: object, status: int | None = None, abortable: bool = True) -> None:
        """Write a JSON body; under X-Fake-Abort-After, half of it, then abort."""
        body, request = json.dumps(obj).encode(), self.request
        if status is not None:
            request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        if request.code not in NO_BODY_CODES:
            request.setHeader(b"content-length", b"%d" % (len(body),))
        if abortable and self._controls.abort_after is not None:
            request.write(body[: len(body) // 2])
            self._abort()
        else:
            request.write(body)
            request.finish()

    def _send_pattern(self, size: int) -> None:
        self.request.setHeader(b"content-type", b"application/octet-stream")
        if self._controls.content_length:
            self.request.setHeader(b"content-length", b"%d" % (size,))
        self.request.write(b"")  # the headers go out even if no byte follows
        if self._controls.abort_after is None:
            self._producer = _PatternProducer(self, size, self.request.finish)
        else:
            self._producer = _PatternProducer(self, size // 2, self._abort)
        self._producer.start()

    def _stream(self, events: _Events) -> None:
        self.request.setHeader(b"content-type", b"text/event-stream")
        self.request.setHeader(b"cache-control", b"no-cache")
        pieces = [i for i, (_, is_content) in enumerate(events) if is_content]
        after, abort_at = self._controls.abort_after, None
        if after is not None and after <= len(pieces):
            abort_at = pieces[0] if after == 0 else pieces[after - 1] + 1
        self._write_events(events, 0, abort_at)

    def _write_events(self, events: _Events, index: int, abort_at: int | None) -> None:
        delay, later = self._controls.chunk_delay, self.reactor.callLater
        while index < len(events) and index != abort_at and not self.record.done.called:
            self.request.write(events[index][0])
            index += 1
            if delay > 0 and index < len(events):
                self._timer = later(delay, self._write_events, events, index, abort_at)
                return
        if self.record.done.called:
            return
        if index == abort_at:
            self._abort()
        else:
            self.request.finish()


class FakeUpstream(Resource):
    """A leaf resource faking the OpenAI and Anthropic HTTP APIs.

    Routes (JSON replies unless streaming; ``model`` echoed from the body):
    ``POST /v1/chat/completions`` and ``POST /v1/messages`` (SSE with
    ``"stream": true``), ``POST /v1/embeddings`` (``encoding_format`` float or
    base64), ``GET /v1/models``, any method on ``/echo[/...]`` (echoes method,
    uri, headers and body); anything else is a 404 OpenAI-shaped error.

    Control headers (invalid values get a 400 JSON error):
        X-Fake-Status: a non-2xx code answers with an OpenAI-shaped error;
            a 2xx code keeps the normal behaviour with that status.
        X-Fake-Chunks: the number of content pieces in a stream (default 5).
        X-Fake-Chunk-Delay: seconds before each streamed event but the first.
        X-Fake-Header-Delay: seconds before the response headers.
        X-Fake-Abort-After: abort the connection after N content pieces of a
            stream (before the closing events if N is the piece count), or
            after half of any other body.
        X-Fake-Body-Bytes: on any route, a 200 ``application/octet-stream``
            body of N pattern bytes from a push producer; chunked unless
            ``X-Fake-Content-Length: 1``.
        X-Fake-Response-Header: ``Name: value`` to add (repeatable).

    Args:
        reactor: An ``IReactorTime`` provider for timers and timestamps.
        max_recorded: How many requests ``requests`` keeps.

    Attributes:
        reactor: The reactor.
        requests: Recorded requests, newest last, at most ``max_recorded``.
    """

    isLeaf = True

    def __init__(self, reactor: IReactorTime, *, max_recorded: int = 1000) -> None:
        super().__init__()
        self.reactor = reactor
        self.requests: collections.deque[UpstreamRequest] = collections.deque(maxlen=max_recorded)
        self._waiters: list[Deferred[UpstreamRequest]] = []

    def next_request(self) -> Deferred[UpstreamRequest]:
        """Wait for the next request.

        Returns:
            A Deferred firing with the next request once its body was read and
            its response started. Cancelling it stops the wait.
        """
        waiter: Deferred[UpstreamRequest] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def render(self, request: Request) -> int:
        """Record the request and start its response.

        Args:
            request: The request, any method.

        Returns:
            ``NOT_DONE_YET``: the response is written asynchronously.
        """
        request.defaultContentType = None
        request.content.seek(0)
        headers = request.requestHeaders.copy()
        record = UpstreamRequest(request.method, request.uri, headers, request.content.read())
        self.requests.append(record)
        _Exchange(self, request, record).start()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(record)
        return NOT_DONE_YET


class _Request(Request):
    """A request whose body is never parsed as a form (the fake reads JSON)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)


class _Site(Site):
    """A Site without access lines: the fake also serves the benchmark,
    where formatting one per request would make it the bottleneck."""

    requestFactory = _Request

    def log(self, request: Request) -> None:
        """No access line."""


def make_site(reactor: IReactorTime, upstream: FakeUpstream | None = None) -> Site:
    """Build a Site serving ``upstream``, or a new :class:`FakeUpstream`.

    Args:
        reactor: An ``IReactorTime`` provider.
        upstream: The resource to serve.

    Returns:
        The Site.
    """
    site = _Site(upstream if upstream is not None else FakeUpstream(reactor), reactor=reactor)
    site.noisy = False
    return site


def listen(
    reactor: IReactorTime,
    endpoint_description: str = "tcp:0:interface=127.0.0.1",
    upstream: FakeUpstream | None = None,
) -> Deferred[tuple[FakeUpstream, IListeningPort]]:
    """Serve ``upstream``, or a new :class:`FakeUpstream`, on a server endpoint.

    Args:
        reactor: The reactor (time, and whatever the endpoint needs).
        endpoint_description: A server endpoint string.
        upstream: The resource to serve.

    Returns:
        A Deferred firing with the upstream and its listening port.
    """
    resource = upstream if upstream is not None else FakeUpstream(reactor)
    endpoint = serverFromString(reactor, endpoint_description)
    return endpoint.listen(make_site(reactor, resource)).addCallback(lambda port: (resource, port))


class FakeUpstreamService(Service):
    """A service serving a fake upstream while it runs.

    Args:
        reactor: The reactor (time, and whatever the endpoint needs).
        endpoint_description: A server endpoint string.
        upstream: The resource to serve; a new one if omitted.

    Attributes:
        upstream: The served :class:`FakeUpstream`.
        port: The listening port while running, else None.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint_description: str = "tcp:0:interface=127.0.0.1",
        upstream: FakeUpstream | None = None,
    ) -> None:
        self.reactor, self.endpoint_description = reactor, endpoint_description
        self.upstream = upstream if upstream is not None else FakeUpstream(reactor)
        self.port: IListeningPort | None = None
        self._listening: Deferred[None] | None = None

    def startService(self) -> None:
        """Start listening; a failure to listen is logged."""
        super().startService()

        def listened(result: tuple[FakeUpstream, IListeningPort]) -> None:
            self.port = result[1]

        def failed(failure: Failure) -> None:
            where = self.endpoint_description
            log.failure("fake upstream: cannot listen on {where}", failure, where=where)

        d = listen(self.reactor, self.endpoint_description, self.upstream)
        self._listening = d.addCallbacks(listened, failed)

    def stopService(self) -> Deferred[None]:
        """Stop listening.

        Returns:
            A Deferred firing once the port stopped listening.
        """
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)

        def stop(_: None) -> Deferred[None] | None:
            port, self.port = self.port, None
            return None if port is None else port.stopListening()

        return listening.addCallback(stop)


def main(argv: list[str] | None = None) -> None:
    """Run a fake upstream until interrupted, logging to stdout.

    Args:
        argv: The command-line arguments; ``sys.argv[1:]`` if None.
    """
    parser = argparse.ArgumentParser(description="llmproxy's fake OpenAI/Anthropic upstream")
    parser.add_argument("--port", type=int, default=9001, help="TCP port, 0 for any")
    parser.add_argument("--interface", default="127.0.0.1", help="the address to bind")
    args = parser.parse_args(argv)

    def run(reactor: Any) -> Deferred[None]:
        observer = textFileLogObserver(sys.stdout)
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
        interface = args.interface.replace(":", "\\:")

        def started(result: tuple[FakeUpstream, IListeningPort]) -> Deferred[None]:
            address = result[1].getHost()
            log.info("fake upstream on {host}:{port}", host=address.host, port=address.port)
            return Deferred()  # never fires: run until the reactor stops

        # A backlog like real servers' (Twisted's default is 50): the
        # benchmark opens a thousand connections a second.
        return listen(
            reactor, f"tcp:{args.port}:interface={interface}:backlog=1024"
        ).addCallback(started)

    react(run)


if __name__ == "__main__":
    main()
