"""One fake upstream response: routing, timers, streaming, abort and outcome.

:class:`Exchange` answers one request of a
:class:`~llmproxy.testing.upstream.FakeUpstream` under its ``X-Fake-*``
controls; :class:`_PatternProducer` writes ``X-Fake-Body-Bytes`` bodies as
a push producer. The exchange sees the fake only through the small
:class:`Upstream` protocol, so this module does not import
:mod:`llmproxy.testing.upstream`, which uses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sized
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.http import NO_BODY_CODES
from twisted.web.server import Request
from zope.interface import implementer

from llmproxy.testing import _replies as replies
from llmproxy.testing import _sse as sse
from llmproxy.testing._controls import BadRequest, Controls
from llmproxy.testing._request import UpstreamRequest

_CHUNK = 64 * 1024
_PATTERN = bytes(range(256)) * (_CHUNK // 256)
_CHUNKS_PER_TURN = 16


class Upstream(Protocol):
    """What an :class:`Exchange` reads of the fake serving its request."""

    @property
    def reactor(self) -> IReactorTime:
        """The reactor for timers and timestamps."""

    @property
    def requests(self) -> Sized:
        """The requests recorded so far: their number goes into reply ids."""


@implementer(IPushProducer)
class _PatternProducer:
    """Writes the ``X-Fake-Body-Bytes`` pattern in 64 KiB chunks while resumed."""

    def __init__(self, exchange: Exchange, stop_at: int, on_end: Callable[[], None]) -> None:
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


class Exchange:
    """One response: controls, timers, streaming, abort and outcome.

    Args:
        upstream: The fake serving the request.
        request: The request being answered.
        record: The request's record; ``done`` fires with the outcome.
        log: The logger for the outcome line (the upstream module's, so the
            events keep that namespace).
    """

    def __init__(
        self, upstream: Upstream, request: Request, record: UpstreamRequest, log: Logger
    ) -> None:
        self.upstream, self.reactor = upstream, upstream.reactor
        self.request, self.record = request, record
        self._log = log
        self._controls = Controls()
        self._timer: IDelayedCall | None = None
        self._producer: _PatternProducer | None = None
        request.notifyFinish().addCallbacks(
            lambda _: self._settle("finished"), lambda _: self._settle("disconnected")
        )

    def start(self) -> None:
        """Parse the controls, then respond now or after the header delay."""
        try:
            self._controls = Controls.parse(self.request.requestHeaders)
        except BadRequest as e:
            error = replies.error(str(e), "invalid_request_error", "bad_fake_control")
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
        self._log.debug(
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
            self._send_json(replies.error(f"fake error {status}", "fake_error", f"http_{status}"))
        elif self._controls.body_bytes is not None:
            self._send_pattern(self._controls.body_bytes)
        else:
            try:
                self._route(self.record.method, self.request.path)
            except BadRequest as e:
                error = replies.error(str(e), "invalid_request_error", "bad_body")
                self._send_json(error, 400, abortable=False)

    def _route(self, method: bytes, path: bytes) -> None:
        api = {
            b"/v1/chat/completions": self._chat,
            b"/v1/embeddings": self._embeddings,
            b"/v1/messages": self._messages,
            b"/v1/responses": self._responses,
        }
        if method == b"POST" and path in api:
            try:
                payload = json.loads(self.record.body)
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                raise BadRequest("the request body is not a JSON object")
            api[path](payload)
        elif method == b"GET" and path == b"/v1/models":
            self._send_json(replies.models())
        elif path == b"/echo" or path.startswith(b"/echo/"):
            self._send_json(replies.echo(self.record))
        else:
            message = f"no route for {method.decode('latin-1')} {path.decode('latin-1')}"
            self._send_json(replies.error(message, "invalid_request_error", "unknown_url"), 404)

    def _chat(self, payload: dict[str, Any]) -> None:
        serial, created = len(self.upstream.requests), int(self.reactor.seconds())
        if payload.get("stream"):
            self._stream(sse.chat_events(payload, serial, created, self._controls.chunks))
        else:
            self._send_json(replies.chat_completion(payload, serial, created))

    def _embeddings(self, payload: dict[str, Any]) -> None:
        self._send_json(replies.embeddings(payload))

    def _messages(self, payload: dict[str, Any]) -> None:
        message = replies.message(payload, len(self.upstream.requests))
        if payload.get("stream"):
            self._stream(sse.message_events(message, self._controls.chunks))
        else:
            self._send_json(message)

    def _responses(self, payload: dict[str, Any]) -> None:
        serial, created = len(self.upstream.requests), int(self.reactor.seconds())
        response = replies.response(payload, serial, created)
        if payload.get("stream"):
            self._stream(sse.response_events(response, self._controls.chunks))
        else:
            self._send_json(response)

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

    def _stream(self, events: sse.Events) -> None:
        self.request.setHeader(b"content-type", b"text/event-stream")
        self.request.setHeader(b"cache-control", b"no-cache")
        pieces = [i for i, (_, is_content) in enumerate(events) if is_content]
        after, abort_at = self._controls.abort_after, None
        if after is not None and after <= len(pieces):
            abort_at = pieces[0] if after == 0 else pieces[after - 1] + 1
        self._write_events(events, 0, abort_at)

    def _write_events(self, events: sse.Events, index: int, abort_at: int | None) -> None:
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
