"""Response bodies: streamed to the client as they come, or thrown away.

:class:`StreamToClient` writes an upstream body to the client chunk by
chunk, with the upstream connection as the client's streaming producer
(:class:`Watched`), so a slow reader pauses the upstream socket instead of
growing a buffer; it aborts a body from which nothing arrives for
``stream_idle`` seconds. :class:`Discard` closes the connection of a body
nobody wants.
"""

from __future__ import annotations

import re
from typing import Any, Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer

from llmproxy.proxy._meter import Meter
from llmproxy.proxy._usage_event import UsageEventFilter

log = Logger(namespace="llmproxy.proxy")


class BodyOwner(TypingProtocol):
    """What a :class:`StreamToClient` needs of the request it serves."""

    request: Request
    rid: str
    record: dict[str, Any]
    meter: Meter
    done: bool

    def body_done(self) -> None:
        """The body ended whole."""

    def body_failed(self, reason: Failure, idled_out: bool) -> None:
        """The body broke off (``idled_out``: after ``stream_idle``)."""


class StreamToClient(Protocol):
    """Receives an upstream response body and writes it to the client.

    When the body ends, its owner (the request's exchange) hears how:
    ``body_done()``, or ``body_failed(reason, idled_out)``. A body with
    neither a length nor chunking ends when the upstream closes, and Twisted
    cannot tell a whole one from one cut short (``PotentialDataLoss``
    either way): it counts as whole only when its last bytes end what it is
    (:func:`ends_whole`), else as broken off.
    """

    def __init__(
        self, exchange: BodyOwner, clock: IReactorTime, idle: float,
        drop_usage_event: bool = False,
    ) -> None:
        """Set up the stream.

        Args:
            exchange: The request.
            clock: For the idle timer.
            idle: Seconds the upstream may stay silent (``stream_idle``).
            drop_usage_event: Take the usage-only event out of the stream
                (the proxy, not the client, asked for it).
        """
        self.exchange = exchange
        self.request = exchange.request
        self.filter = UsageEventFilter(self.request.write) if drop_usage_event else None
        self.record = exchange.record
        self.meter = exchange.meter
        self.producing = False
        self.clock = clock
        self.idle = idle
        self.idle_timer: Any = None
        # When the upstream last sent. The timer is lazy: a chunk only
        # records the time, and the timer, when it fires, checks it and
        # comes back later if the upstream was not silent for long enough
        # (resetting a DelayedCall per chunk costs far more).
        self.last = 0.0
        self.idled_out = False
        # The body's last two chunks, for a body that ends with a close.
        self.tail = (b"", b"")

    def connectionMade(self) -> None:
        """Become the client's producer, or stop at once if it left."""
        if self.exchange.done:
            self.transport.stopProducing()
            return
        self.request.registerProducer(Watched(self.transport, self), True)
        self.producing = True
        self.watch()

    def watch(self) -> None:
        """(Re)start the stream-idle timer: the upstream must send in time."""
        self.last = self.clock.seconds()
        if self.idle_timer is None:
            self.idle_timer = self.clock.callLater(self.idle, self._check)

    def unwatch(self) -> None:
        """Stop the timer (while the client, not the upstream, is slow)."""
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None

    def _check(self) -> None:
        """The timer fired: abort if the upstream was silent for ``idle`` s."""
        self.idle_timer = None
        quiet = self.clock.seconds() - self.last
        if quiet < self.idle:
            self.idle_timer = self.clock.callLater(self.idle - quiet, self._check)
            return
        self.idled_out = True
        log.warn(
            "no byte from upstream {upstream} for {seconds} s: aborting the "
            "response of request {request_id}",
            upstream=self.record["upstream"],
            seconds=self.idle,
            request_id=self.exchange.rid,
        )
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        """Pass a chunk on to the client (and to the usage reader)."""
        self.last = self.clock.seconds()
        self.tail = (self.tail[1], data)
        if not self.exchange.done:
            self.record["bytes_out"] += len(data)
            reader = self.meter.reader
            if reader is not None:
                reader.feed(data)
            if self.filter is not None:
                self.filter.feed(data)
            else:
                self.request.write(data)

    def stop(self) -> None:
        """Close the upstream connection: nobody reads this response."""
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        """The body ended: tell the exchange how."""
        self.unwatch()
        exchange = self.exchange
        if self.producing:
            self.producing = False
            if not exchange.done:
                self.request.unregisterProducer()
        if reason.check(ResponseDone) or (
            reason.check(PotentialDataLoss) and not self.idled_out
            and ends_whole(b"".join(self.tail), self.record["stream"])
        ):
            if self.filter is not None and not exchange.done:
                self.filter.finish()
            exchange.body_done()
        else:
            exchange.body_failed(reason, self.idled_out)


#: What ends an event stream: OpenAI's ``[DONE]``, Anthropic's
#: ``message_stop`` or ``error``, the Responses API's final events.
_STREAM_ENDS = re.compile(
    rb"data: ?\[DONE\]|event: ?(message_stop|error|response\.(completed|failed|incomplete))"
    rb'|"type": ?"(message_stop|error|response\.(completed|failed|incomplete))"'
)


def ends_whole(tail: bytes, event_stream: bool) -> bool:
    """Whether a body ended by a close ends as a whole one does.

    Args:
        tail: The body's last bytes (its last two chunks).
        event_stream: Whether it is ``text/event-stream``.

    Returns:
        For an event stream, whether its last event is one that ends a
        stream; for anything else, whether it ends with a JSON document's
        closing ``}`` or ``]``.
    """
    tail = tail.rstrip()
    if event_stream:
        last_event = max(tail.rfind(b"\n\n"), tail.rfind(b"\r\r"), tail.rfind(b"\r\n\r\n"))
        return _STREAM_ENDS.search(tail, last_event + 1) is not None
    return tail[-1:] in (b"}", b"]")


@implementer(IPushProducer)
class Watched:
    """The upstream connection as the client's producer, minding idleness.

    While the client's connection pauses the upstream (a slow reader), the
    stream-idle timer stops: silence then is not the upstream's fault.
    """

    def __init__(self, producer: IPushProducer, stream: StreamToClient) -> None:
        self._producer = producer
        self._stream = stream

    def pauseProducing(self) -> None:
        """The client is slow: pause the upstream, stop the idle timer."""
        self._stream.unwatch()
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        """The client reads again: resume the upstream and the timer."""
        self._stream.watch()
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        """The client is gone: close the upstream connection."""
        self._producer.stopProducing()


class Discard(Protocol):
    """Throws an upstream response away (closing its connection)."""

    def connectionMade(self) -> None:
        """Close the connection: the body is not wanted."""
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        """Nothing to do: the body is not wanted."""
