"""One proxied request's state, its access record and its response body.

:class:`_Exchange` follows a request from render to its one access record;
:class:`_StreamToClient` streams the upstream body to the client with the
upstream connection as the client's producer (:class:`_Watched`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer

from llmproxy.net import NetworkSet
from llmproxy.limits import KeyStore
from llmproxy.limits._store import Limits
from llmproxy.logs import ACCESS_NAMESPACE
from llmproxy.metrics import Metrics
from llmproxy.proxy._errors import _describe_failure
from llmproxy.proxy._usage import UsageReader

# The package's namespace, as before the split into modules.
log = Logger(namespace="llmproxy.proxy")

_access = Logger(namespace=ACCESS_NAMESPACE)

#: The access record's format for readable (console) output.
ACCESS_FORMAT = (
    "{method} {path} {status} {outcome} {latency_ms}ms model={model} "
    "upstream={upstream} egress={egress} request_id={request_id}"
)


@attrs.frozen
class Guard:
    """Who may use the proxy, and how much.

    Attributes:
        trusted: Peers whose X-Forwarded-For / X-Real-IP are believed.
        keys: Client keys, or None for an open proxy.
        limits: The rate limit and the keys' budgets, or None.
        limit_by_key: Buckets per client key instead of per IP.
    """

    trusted: NetworkSet = attrs.field(factory=lambda: NetworkSet(()))
    keys: KeyStore | None = None
    limits: Limits | None = None
    limit_by_key: bool = False


class _Exchange:
    """One proxied request, from render to its access record.

    Attributes:
        record: The access record's fields, filled in as the request goes.
    """

    def __init__(
        self,
        request: Request,
        rid: str,
        path: bytes,
        clock: IReactorTime,
        metrics: Metrics | None,
        access_log: bool = True,
    ) -> None:
        self.request = request
        self.access_log = access_log
        self.rid = rid
        self.clock = clock
        self.metrics = metrics
        self.started = clock.seconds()
        self.upstream: str | None = None
        self.record: dict[str, Any] = {
            "request_id": rid,
            "client_ip": None,
            "method": request.method.decode("ascii", "replace"),
            "path": path.decode("utf-8", "replace"),
            "route": None,
            "model": None,
            "upstream": None,
            "status": None,
            "bytes_in": 0,
            "bytes_out": 0,
            "stream": False,
            "ttfb_ms": None,
            "egress": None,
            "address": None,
        }
        self.usage: UsageReader | None = None
        self.logged = False
        self.client_gone = False
        self.timed_out = False
        self.timer: Any = None
        self.pending: Any = None  # the attempt in flight (has cancel())
        self.body: _StreamToClient | None = None
        self.on_done: Any = None
        # The attempts: which pool, which upstreams were tried, what is sent.
        self.pool: Any = None
        self.url: str | None = None
        self.tried: set[str] = set()
        self.attempts = 0
        self.fallbacks: list[str] = []
        self.waited = False
        self.path = b""
        self.query = b""
        self.body_sent = b""
        # The client's key (with its budget) and the limits that count it.
        self.key: Any = None
        self.limits: Any = None
        # The upstream response's headers, copied to the client's (undone
        # when its body fails before a byte reached the client).
        self.upstream_headers: Any = None
        if metrics is not None:
            metrics.started()

    def elapsed_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return round((self.clock.seconds() - self.started) * 1000.0, 3)

    def log_done(self, outcome: str, error_code: str | None = None) -> None:
        """Emit the request's one access record (once) and count it."""
        if self.logged:
            return
        self.logged = True
        record = self.record
        record["outcome"] = outcome
        record["latency_ms"] = self.elapsed_ms()
        record["attempts"] = self.attempts
        if error_code is not None:
            record["error_code"] = error_code
        if self.usage is not None:
            usage = self.usage.finish()
            for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
                value = getattr(usage, name)
                if value is not None:
                    record[name] = value
            if self.key is not None and self.limits is not None and outcome != "error":
                if usage.prompt_tokens is None and usage.completion_tokens is None:
                    tokens = None
                else:
                    tokens = (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
                self.limits.record_usage(self.key, tokens)
        if self.access_log:
            # What Logger.info would emit, built directly: once per request.
            event = dict(record)
            event.update(
                log_logger=_access,
                log_level=LogLevel.info,
                log_namespace=_access.namespace,
                log_source=None,
                log_format=ACCESS_FORMAT,
                log_time=time.time(),
            )
            _access.observer(event)
        if self.metrics is not None:
            self.metrics.observe(record)
        if self.on_done is not None:
            self.on_done(self)

    def on_client_gone(self, reason: Failure) -> None:
        """The client closed its connection before we finished: stop paying."""
        self.client_gone = True
        self.log_done("client_closed")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
        if self.body is not None:
            self.body.stop()


class _StreamToClient(Protocol):
    """Receives an upstream response body and writes it to the client.

    The upstream connection is registered as the downstream request's
    streaming producer, so a client that reads slowly pauses the upstream
    socket.
    """

    def __init__(
        self,
        exchange: _Exchange,
        clock: IReactorTime,
        idle: float,
        failed_early: Callable[[_Exchange, Failure, bool], object] | None = None,
    ) -> None:
        """Set up the stream.

        Args:
            exchange: The request.
            clock: For the idle timer.
            idle: Seconds the upstream may stay silent (``stream_idle``).
            failed_early: Called as ``failed_early(exchange, reason,
                idled_out)`` when the body fails before anything was sent
                to the client (the head, then the upstream died): still a
                failure before the first byte, which the caller may retry.
                It takes over the pool's accounting.
        """
        self.exchange = exchange
        self.failed_early = failed_early
        self.request = exchange.request
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

    def connectionMade(self) -> None:
        if self.exchange.client_gone:
            self.transport.stopProducing()
            return
        self.request.registerProducer(_Watched(self.transport, self), True)
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
        self._idle()

    def _idle(self) -> None:
        self.idle_timer = None
        self.idled_out = True
        log.warn(
            "no byte from upstream {upstream} for {seconds} s: aborting the "
            "response of request {request_id}",
            upstream=self.exchange.upstream,
            seconds=self.idle,
            request_id=self.exchange.rid,
        )
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        self.last = self.clock.seconds()
        if not exchange.client_gone:
            exchange.record["bytes_out"] += len(data)
            if exchange.usage is not None:
                exchange.usage.feed(data)
            self.request.write(data)

    def stop(self) -> None:
        """Close the upstream connection: nobody reads this response."""
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        exchange = self.exchange
        exchange.body = None
        self.unwatch()
        if self.producing:
            self.producing = False
            if not exchange.client_gone:
                self.request.unregisterProducer()
        done = isinstance(reason.value, (ResponseDone, PotentialDataLoss))
        if (
            not done
            and not exchange.client_gone
            and not self.request.startedWriting
            and self.failed_early is not None
        ):
            # Nothing reached the client yet, not even the head: the
            # upstream failed before the first byte after all.
            self.failed_early(exchange, reason, self.idled_out)
            return
        if exchange.pool is not None and exchange.url is not None:
            exchange.pool.finished(exchange.url)
        if exchange.client_gone:
            return
        if done:
            self.request.finish()
            exchange.log_done("ok")
            return
        # The upstream died mid-body: close the client's connection without
        # the final chunk so that it sees a truncated response, never a
        # complete-looking one.
        log.warn(
            "upstream {upstream} broke off the response body of request "
            "{request_id}: {reason}",
            upstream=exchange.upstream,
            request_id=exchange.rid,
            reason=_describe_failure(reason),
        )
        exchange.log_done(
            "upstream_aborted", "stream_idle" if self.idled_out else "upstream_aborted"
        )
        self.request.loseConnection()


@implementer(IPushProducer)
class _Watched:
    """The upstream connection as the client's producer, minding idleness.

    While the client's connection pauses the upstream (a slow reader), the
    stream-idle timer stops: silence then is not the upstream's fault.
    """

    def __init__(self, producer: IPushProducer, stream: _StreamToClient) -> None:
        self._producer = producer
        self._stream = stream

    def pauseProducing(self) -> None:
        self._stream.unwatch()
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._stream.watch()
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()


class _Discard(Protocol):
    """Throws an upstream response away (closing its connection)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        """Nothing to do: the body is not wanted."""
