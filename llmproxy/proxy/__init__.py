"""One proxied request's life.

:class:`ProxyResource` reads the (already size-limited) body, asks the
:class:`~llmproxy.routing.Router` where it goes, forwards it with the Agent
and streams the response back as it arrives: the upstream connection is the
downstream request's streaming producer, so a slow client pauses the
upstream socket instead of growing a buffer here. When the client leaves, the
upstream request is cancelled or its connection closed. Failures become
OpenAI-shaped JSON errors.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

import attrs

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from OpenSSL import SSL
from service_identity import VerificationError
from zope.interface import implementer

from llmproxy.config import TimeoutsConfig
from llmproxy.egress import Egress, TunnelError, TunnelTimeout
from llmproxy.egress._noproxy import NetworkSet
from llmproxy.limits import KeyStore, RateLimiter, client_ip, presented_key, retry_after
from llmproxy.metrics import Metrics
from llmproxy.proxy._usage import UsageReader
from llmproxy.routing import Router, extract_model

__all__ = ["ACCESS_FORMAT", "Guard", "ProxyResource", "error_body", "request_id_for"]

log = Logger()

#: Headers that describe one connection, never the message (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"proxy-connection",
    }
)

# Request headers the Agent writes itself from the request it sends.
_REQUEST_OWN = HOP_BY_HOP | {b"host", b"content-length", b"expect"}

_MAX_REQUEST_ID = 128


def request_id_for(given: bytes | None) -> str:
    """Return the request id to use for a request.

    Args:
        given: The client's ``X-Request-ID`` header, if any.

    Returns:
        The client's id, trimmed, when it is 1-128 printable ASCII
        characters; otherwise a new uuid4.
    """
    if given is not None:
        value = given.strip()
        if 0 < len(value) <= _MAX_REQUEST_ID and all(0x20 < c < 0x7F for c in value):
            return value.decode("ascii")
    return str(uuid.uuid4())


def error_body(message: str, type_: str, code: str, request_id: str) -> bytes:
    """Render an error in the OpenAI shape.

    Args:
        message: What went wrong, for a person.
        type_: The error type (``invalid_request_error``, ``upstream_error``).
        code: A stable machine-readable code.
        request_id: The request's id.

    Returns:
        The JSON body ``{"error": {"message", "type", "code", "request_id"}}``.
    """
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": type_,
                "code": code,
                "request_id": request_id,
            }
        }
    ).encode("utf-8")


def send_error(
    request: Request, status: int, message: str, type_: str, code: str, rid: str
) -> None:
    """Answer a request with a JSON error and finish it.

    Args:
        request: The downstream request.
        status: The HTTP status code.
        message: What went wrong.
        type_: The error type.
        code: The error code.
        rid: The request id.
    """
    body = error_body(message, type_, code, rid)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.responseHeaders.setRawHeaders(b"x-request-id", [rid.encode("ascii")])
    request.write(body)
    request.finish()


def _connection_tokens(headers: Headers) -> set[bytes]:
    """Header names listed in ``Connection`` (hop-by-hop by declaration)."""
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", ()):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def _end_to_end(headers: Headers, drop: frozenset[bytes] | set[bytes]) -> list:
    """The (name, values) pairs of ``headers`` that may cross the proxy."""
    extra = _connection_tokens(headers) if headers.hasHeader(b"connection") else ()
    return [
        (name, values)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in drop and name.lower() not in extra
    ]


@implementer(IBodyProducer)
class _BytesProducer:
    """Sends a request body that is already in memory, as it was received."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body was written in one piece."""

    def resumeProducing(self) -> None:
        """Nothing to resume: the body was written in one piece."""

    def stopProducing(self) -> None:
        """Nothing to stop: the body was written in one piece."""


_access = Logger(namespace="llmproxy.access")

#: The access record's format for readable (console) output.
ACCESS_FORMAT = (
    "{method} {path} {status} {outcome} {latency_ms}ms model={model} "
    "upstream={upstream} egress={egress} request_id={request_id}"
)


_DOT_SEGMENTS = frozenset({b".", b".."})


def _bad_target(uri: bytes, segments: list[bytes]) -> str | None:
    """Why a request target must not be forwarded, or None if it is fine.

    Only origin-form targets (``/path?query``) are proxied: an absolute-form
    target (``http://elsewhere/``) is not a request for us, and ``.`` or
    ``..`` segments (percent-encoded or not, or hidden behind an encoded
    slash) would let a client climb out of the route's base path upstream.

    Args:
        uri: The request target as received.
        segments: The raw (still percent-encoded) path segments routed.
    """
    if not uri.startswith(b"/"):
        return "only origin-form request targets (/path) are accepted"
    for segment in segments:
        decoded = segment
        for _ in range(3):  # some stacks decode more than once: so do we
            parts = decoded.replace(b"\\", b"/").split(b"/")
            if any(part in _DOT_SEGMENTS for part in parts):
                return "'.' and '..' path segments are not allowed"
            if b"%" not in decoded:
                break
            decoded = unquote_to_bytes(decoded)
    return None


#: Bytes a path keeps as they are; anything else is percent-encoded, so an
#: upstream URL is always ASCII (existing %XX escapes are kept unchanged).
_PATH_SAFE = b"/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + b"?"


def _safe_path(path: bytes) -> bytes:
    """Percent-encode bytes that may not appear raw in a URL path."""
    return quote_from_bytes(path, safe=_PATH_SAFE).encode("ascii")


def _safe_query(query: bytes) -> bytes:
    """Percent-encode bytes that may not appear raw in a URL query."""
    return quote_from_bytes(query, safe=_QUERY_SAFE).encode("ascii")


@attrs.frozen
class Guard:
    """Who may use the proxy, and how much.

    Attributes:
        trusted: Peers whose X-Forwarded-For / X-Real-IP are believed.
        keys: Client keys, or None for an open proxy.
        limiter: The per-client token buckets, or None.
        limit_by_key: Buckets per client key instead of per IP.
    """

    trusted: NetworkSet = attrs.field(factory=lambda: NetworkSet(()))
    keys: KeyStore | None = None
    limiter: RateLimiter | None = None
    limit_by_key: bool = False


#: Client credential headers: never forwarded when llmproxy checks keys or
#: the route has its own upstream key.
_CREDENTIALS = (b"authorization", b"x-api-key", b"api-key")


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
        self.pending: Deferred[IResponse] | None = None
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
        if metrics is not None:
            metrics.inflight.inc()

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
            self.metrics.inflight.dec()
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

    def __init__(self, exchange: _Exchange, clock: IReactorTime, idle: float) -> None:
        self.exchange = exchange
        self.request = exchange.request
        self.producing = False
        self.clock = clock
        self.idle = idle
        self.idle_timer: Any = None
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
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.reset(self.idle)
        else:
            self.idle_timer = self.clock.callLater(self.idle, self._idle)

    def unwatch(self) -> None:
        """Stop the timer (while the client, not the upstream, is slow)."""
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None

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
        if self.idle_timer is not None:
            self.idle_timer.reset(self.idle)
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
        if exchange.pool is not None and exchange.url is not None:
            exchange.pool.finished(exchange.url)
        if self.producing:
            self.producing = False
            if not exchange.client_gone:
                self.request.unregisterProducer()
        if exchange.client_gone:
            return
        if reason.check(ResponseDone, http.PotentialDataLoss):
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


def _retry_after(response: IResponse) -> float | None:
    """An upstream's Retry-After in seconds, if it sent a number."""
    value = response.headers.getRawHeaders(b"retry-after", [None])[0]
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None


def _with_model(body: bytes, model: str) -> bytes:
    """The JSON body with its ``model`` replaced (nothing else changes)."""
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict):
        return body
    document["model"] = model
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


_WRAPPERS = (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)


def _causes(failure: Failure) -> list[Failure]:
    """The root failures inside Twisted's wrapper exceptions."""
    if failure.check(*_WRAPPERS):
        reasons = getattr(failure.value, "reasons", None) or []
        found = [cause for reason in reasons for cause in _causes(reason)]
        if found:
            return found
    return [failure]


def _describe_failure(failure: Failure) -> str:
    """One line about why an upstream exchange failed."""
    texts = []
    for cause in _causes(failure):
        value = cause.value
        text = " ".join(str(value).split()) or type(value).__name__
        if text not in texts:
            texts.append(text[:300])
    return "; ".join(texts)


def _is_tls_failure(failure: Failure) -> bool:
    return failure.check(SSL.Error, VerificationError) is not None


class ProxyResource(Resource):
    """Forwards every request to the upstream its route names.

    The routed path is the part of the request path below the resource:
    ``/chat/completions`` whether the resource is the site root or mounted
    under ``/llm/``.
    """

    isLeaf = True

    def __init__(
        self,
        router: Router,
        agent: Egress | IAgent,
        reactor: IReactorTime,
        timeouts: TimeoutsConfig,
        metrics: Metrics | None = None,
        access_log: bool = True,
        guard: Guard | None = None,
        max_retry_wait: float = 2.0,
    ) -> None:
        """Set up the proxy.

        Args:
            router: Chooses the upstream pool for each request.
            agent: Sends requests upstream: the :class:`Egress` (which
                honours each route's ``via``) or any IAgent.
            reactor: Schedules timeouts and measures latency.
            timeouts: Time limits.
            metrics: Where finished requests are counted, if anywhere.
            access_log: Whether to log an access record per request.
            guard: Client addresses, keys and rate limits.
            max_retry_wait: Longest upstream Retry-After honoured when no
                other upstream is left.
        """
        super().__init__()
        self.router = router
        self.agent = agent
        self.reactor = reactor
        self.timeouts = timeouts
        self.metrics = metrics
        self.access_log = access_log
        self.guard = guard or Guard()
        self.max_retry_wait = max_retry_wait
        #: Requests in flight (for a graceful stop).
        self.inflight: set[_Exchange] = set()
        self._drained: list[Deferred[None]] = []

    def render(self, request: Request) -> Any:
        """Forward ``request`` upstream; the response follows later.

        Args:
            request: The downstream request, whose body was read already.

        Returns:
            ``NOT_DONE_YET``.
        """
        rid = request_id_for(request.getHeader(b"x-request-id"))
        # twisted.web unquotes postpath; route and forward the raw path.
        raw = request.path.split(b"/")[1 + len(request.prepath):] if request.path[:1] == b"/" else []
        path = _safe_path(b"/" + b"/".join(raw))
        problem = _bad_target(request.uri, raw)
        if problem is not None:
            send_error(request, 400, problem, "invalid_request_error", "invalid_path", rid)
            return NOT_DONE_YET
        request.content.seek(0)
        body = request.content.read()
        exchange = _Exchange(request, rid, path, self.reactor, self.metrics, self.access_log)
        peer = getattr(request.getClientAddress(), "host", None)
        client = client_ip(peer, request.requestHeaders, self.guard.trusted)
        exchange.record["client_ip"] = client
        exchange.record["bytes_in"] = len(body)
        if not self._admit(request, exchange, client):
            return NOT_DONE_YET
        model = extract_model(body)
        exchange.record["model"] = model
        route = self.router.route(path, model)
        if route is None:
            exchange.record["status"] = 404
            send_error(
                request,
                404,
                f"no route for path {path.decode('utf-8', 'replace')!r}",
                "invalid_request_error",
                "route_not_found",
                rid,
            )
            exchange.log_done("error")
            return NOT_DONE_YET
        exchange.record["route"] = route.path_key
        _, question, query = request.uri.partition(b"?")
        exchange.path, exchange.query = path, question + _safe_query(query)
        exchange.body_sent = body
        exchange.pool = route.pool
        exchange.fallbacks = list(route.fallbacks)
        if route.rewrite_model is not None:
            self._switch_model(exchange, route.rewrite_model, body)
        request.notifyFinish().addErrback(exchange.on_client_gone)
        self.inflight.add(exchange)
        exchange.on_done = self._done
        self._attempt(exchange)
        return NOT_DONE_YET

    def _switch_model(self, exchange: _Exchange, model: str, body: bytes) -> None:
        """Send ``model`` upstream instead of the client's (alias, fallback)."""
        exchange.body_sent = _with_model(body, model)
        exchange.record["model"] = model

    def _attempt(self, exchange: _Exchange, url: str | None = None) -> None:
        """Send the request to the pool's next upstream (or to ``url``)."""
        if exchange.client_gone:
            return
        pool = exchange.pool
        if url is None:
            url = pool.pick(exclude=exchange.tried)
        exchange.tried.add(url)
        exchange.attempts += 1
        exchange.url = url
        exchange.upstream = url
        exchange.record["upstream"] = url
        pool.started(url)
        request = exchange.request
        target = url.encode("utf-8") + exchange.path + exchange.query
        headers = self._upstream_headers(request, exchange.rid, pool)
        body = exchange.body_sent
        producer = _BytesProducer(body) if body else None
        if isinstance(self.agent, Egress):
            d = self.agent.request(request.method, target, headers, producer, pool.via)
        else:
            d = self.agent.request(request.method, target, headers, producer)
        exchange.pending = d
        exchange.timer = self.reactor.callLater(
            self.timeouts.response_header, self._headers_timed_out, exchange
        )
        d.addCallbacks(
            self._got_response,
            self._failed,
            callbackArgs=(exchange,),
            errbackArgs=(exchange,),
        )
        d.addErrback(self._bug, exchange)

    def _can_retry(self, exchange: _Exchange) -> bool:
        """Move on to another upstream if one is left: True if so."""
        pool = exchange.pool
        if len(exchange.tried) <= pool.retries and len(exchange.tried) < len(pool.urls):
            return True
        while exchange.fallbacks:
            model = exchange.fallbacks.pop(0)
            fallback = self.router.pool_for_model(model)
            if fallback is None:
                continue
            log.info(
                "request {request_id}: every upstream of {model} failed; falling back "
                "to {fallback}",
                request_id=exchange.rid,
                model=exchange.record.get("model"),
                fallback=model,
            )
            exchange.pool = fallback
            exchange.tried = set()
            self._switch_model(exchange, model, exchange.body_sent)
            exchange.record["fallback"] = True
            if self.metrics is not None:
                self.metrics.fallbacks.labels(model).inc()
            return True
        return False

    def _upstream_failed(self, exchange: _Exchange, reason: str) -> bool:
        """Count a failed attempt; start the next one if possible (True)."""
        pool, url = exchange.pool, exchange.url
        pool.finished(url)
        if pool.failed(url) and self.metrics is not None:
            self.metrics.ejections.labels(url).inc()
        if exchange.client_gone or not self._can_retry(exchange):
            return False
        log.info(
            "request {request_id}: attempt {attempt} to {upstream} failed ({reason}); "
            "trying another upstream",
            request_id=exchange.rid,
            attempt=exchange.attempts,
            upstream=url,
            reason=reason,
        )
        if self.metrics is not None:
            self.metrics.retries.labels(exchange.record["route"] or "none").inc()
        self._attempt(exchange)
        return True

    def _admit(self, request: Request, exchange: _Exchange, client: str | None) -> bool:
        """Check the client's key and rate limit; answer 401/429 if refused."""
        guard = self.guard
        key_id = None
        if guard.keys is not None:
            key_id = guard.keys.check(presented_key(request.requestHeaders))
            if key_id is None:
                exchange.record["status"] = 401
                send_error(
                    request, 401,
                    "a valid API key is required (Authorization: Bearer KEY or x-api-key)",
                    "invalid_request_error", "invalid_api_key", exchange.rid,
                )
                exchange.log_done("error", "invalid_api_key")
                return False
            exchange.record["client_key"] = key_id
        if guard.limiter is not None:
            bucket = key_id if guard.limit_by_key and key_id else (client or "unknown")
            wait = guard.limiter.take(bucket)
            if wait > 0:
                seconds = retry_after(wait)
                exchange.record["status"] = 429
                request.responseHeaders.setRawHeaders(b"retry-after", [b"%d" % seconds])
                send_error(
                    request, 429, f"rate limit exceeded: retry in {seconds} s",
                    "rate_limit_error", "rate_limited", exchange.rid,
                )
                if self.metrics is not None:
                    self.metrics.rate_limited.inc()
                exchange.log_done("error", "rate_limited")
                return False
        return True

    def _done(self, exchange: _Exchange) -> None:
        self.inflight.discard(exchange)
        if not self.inflight and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Fire when no request is in flight (now, or when the last ends).

        Returns:
            A Deferred; cancel it to stop waiting.
        """
        if not self.inflight:
            return succeed(None)

        def cancel(d: Deferred[None]) -> None:
            if d in self._drained:
                self._drained.remove(d)

        d: Deferred[None] = Deferred(cancel)
        self._drained.append(d)
        return d

    def abort_inflight(self) -> None:
        """Close the connections of every request still in flight."""
        for exchange in list(self.inflight):
            transport = getattr(exchange.request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()

    def _upstream_headers(self, request: Request, rid: str, pool: Any = None) -> Headers:
        """The headers to send upstream: end-to-end ones plus forwarding."""
        headers = Headers()
        drop = _REQUEST_OWN
        api_key = getattr(pool, "api_key", None)
        auth_header = getattr(pool, "auth_header", "bearer")
        if self.guard.keys is not None or api_key is not None or auth_header == "none":
            drop = drop | frozenset(_CREDENTIALS)
        for name, values in _end_to_end(request.requestHeaders, drop):
            headers.setRawHeaders(name, values)
        if api_key is not None and auth_header != "none":
            value = api_key.encode("utf-8")
            if auth_header == "bearer":
                headers.setRawHeaders(b"authorization", [b"Bearer " + value])
            else:
                headers.setRawHeaders(auth_header.encode("ascii"), [value])
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        if host:
            forwarded = headers.getRawHeaders(b"x-forwarded-for")
            chain = b", ".join(forwarded + [host.encode("ascii")]) if forwarded else host.encode("ascii")
            headers.setRawHeaders(b"x-forwarded-for", [chain])
        headers.setRawHeaders(
            b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"]
        )
        headers.setRawHeaders(b"x-request-id", [rid.encode("ascii")])
        return headers

    def _headers_timed_out(self, exchange: _Exchange) -> None:
        exchange.timer = None
        if exchange.pending is not None:
            exchange.timed_out = True
            exchange.pending.cancel()

    def _got_response(self, response: IResponse, exchange: _Exchange) -> None:
        exchange.pending = None
        if exchange.timer is not None:
            exchange.timer.cancel()
            exchange.timer = None
        request = exchange.request
        if exchange.client_gone:
            exchange.pool.finished(exchange.url)
            response.deliverBody(_Discard())
            return
        pool = exchange.pool
        if response.code in pool.retry_on:
            if self._upstream_failed(exchange, f"status {response.code}"):
                response.deliverBody(_Discard())
                return
            wait = _retry_after(response)
            if wait is not None and wait <= self.max_retry_wait and not exchange.waited:
                # Nobody else to ask: honour a short Retry-After, once.
                exchange.waited = True
                response.deliverBody(_Discard())
                log.info(
                    "request {request_id}: {upstream} asked to retry in {wait} s",
                    request_id=exchange.rid, upstream=exchange.url, wait=wait,
                )
                exchange.timer = self.reactor.callLater(
                    wait, self._attempt, exchange, exchange.url
                )
                return
            pool.started(exchange.url)  # it answers after all: back in flight
        else:
            pool.succeeded(exchange.url)
        record = exchange.record
        record["status"] = response.code
        record["ttfb_ms"] = exchange.elapsed_ms()
        record["egress"] = getattr(response, "egress", None)
        record["address"] = getattr(response, "address", None)
        content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
        record["stream"] = bool(content_type) and content_type.lower().startswith(
            b"text/event-stream"
        )
        if exchange.access_log or exchange.metrics is not None:
            encoding = response.headers.getRawHeaders(b"content-encoding", [None])[0]
            exchange.usage = UsageReader(content_type, encoding)
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        for name, values in _end_to_end(response.headers, HOP_BY_HOP):
            out.setRawHeaders(name, values)
        # Twisted's client keeps Content-Length out of response.headers: a
        # known length is kept, so that a body cut short upstream is visibly
        # short for the client too.
        if (
            response.length is not UNKNOWN_LENGTH
            and request.method != b"HEAD"
            and response.code not in http.NO_BODY_CODES
        ):
            out.setRawHeaders(b"content-length", [b"%d" % response.length])
        out.setRawHeaders(b"x-request-id", [exchange.rid.encode("ascii")])
        out.setRawHeaders(b"x-llmproxy-upstream-attempts", [b"%d" % exchange.attempts])
        request.defaultContentType = None
        exchange.body = _StreamToClient(exchange, self.reactor, self.timeouts.stream_idle)
        response.deliverBody(exchange.body)

    def _failed(self, failure: Failure, exchange: _Exchange) -> None:
        exchange.pending = None
        if exchange.timer is not None:
            exchange.timer.cancel()
            exchange.timer = None
        if exchange.client_gone:
            exchange.pool.finished(exchange.url)
            if not failure.check(CancelledError):
                log.debug("request {request_id} failed after its client left",
                          request_id=exchange.rid)
            return
        status, code, message = self._classify(failure, exchange)
        if not exchange.timed_out and self._upstream_failed(exchange, message):
            return
        if exchange.timed_out:
            # Not retried (the client waited long enough), but it counts
            # against the upstream's health.
            exchange.pool.finished(exchange.url)
            if exchange.pool.failed(exchange.url) and self.metrics is not None:
                self.metrics.ejections.labels(exchange.url).inc()
        exchange.request.responseHeaders.setRawHeaders(
            b"x-llmproxy-upstream-attempts", [b"%d" % exchange.attempts]
        )
        log.warn(
            "request {request_id} to {upstream} failed: {message}",
            request_id=exchange.rid,
            upstream=exchange.upstream,
            message=message,
        )
        exchange.record["status"] = status
        send_error(exchange.request, status, message, "upstream_error", code, exchange.rid)
        exchange.log_done("error", code)

    def _classify(self, failure: Failure, exchange: _Exchange) -> tuple[int, str, str]:
        """Map an upstream failure to (status, code, message)."""
        where = exchange.upstream
        if exchange.timed_out:
            return (
                504,
                "upstream_timeout",
                f"upstream {where} sent no response headers within "
                f"{self.timeouts.response_header:g} s",
            )
        causes = _causes(failure)
        for cause in causes:
            if cause.check(TunnelTimeout):
                return 504, "upstream_proxy_timeout", str(cause.value)
            if cause.check(TunnelError):
                return 502, "upstream_proxy_error", str(cause.value)
            if _is_tls_failure(cause):
                return 502, "upstream_tls_error", (
                    f"TLS to upstream {where} failed (bad or untrusted certificate?): "
                    f"{_describe_failure(cause)}"
                )
            if cause.check(ierror.DNSLookupError):
                return 502, "upstream_dns_error", (
                    f"upstream host name of {where} does not resolve"
                )
            if cause.check(ierror.ConnectionRefusedError):
                return 502, "upstream_refused", f"upstream {where} refused the connection"
            if cause.check(ierror.TimeoutError, ierror.TCPTimedOutError):
                return 504, "upstream_connect_timeout", (
                    f"connecting to upstream {where} timed out after "
                    f"{self.timeouts.connect:g} s"
                )
        if any(cause.check(ierror.ConnectError) for cause in causes):
            return 502, "upstream_unreachable", (
                f"upstream {where} is unreachable: {_describe_failure(failure)}"
            )
        return 502, "upstream_failed", (
            f"upstream {where} failed before responding: {_describe_failure(failure)}"
        )

    def _bug(self, failure: Failure, exchange: _Exchange) -> None:
        log.failure(
            "bug while proxying request {request_id}",
            failure,
            request_id=exchange.rid,
        )
        if not exchange.client_gone and not exchange.request.finished:
            exchange.request.loseConnection()
