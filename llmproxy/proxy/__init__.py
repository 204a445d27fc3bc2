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

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
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
from llmproxy.metrics import Metrics
from llmproxy.proxy._usage import UsageReader
from llmproxy.routing import Router, extract_model

__all__ = ["ACCESS_FORMAT", "ProxyResource", "error_body", "request_id_for"]

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
        self.access_log = access_log
        self.started = clock.seconds()
        peer = request.getClientAddress()
        self.upstream: str | None = None
        self.record: dict[str, Any] = {
            "request_id": rid,
            "client_ip": getattr(peer, "host", None),
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

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.request = exchange.request
        self.producing = False

    def connectionMade(self) -> None:
        if self.exchange.client_gone:
            self.transport.stopProducing()
            return
        self.request.registerProducer(self.transport, True)
        self.producing = True

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
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
        exchange.log_done("upstream_aborted", "upstream_aborted")
        self.request.loseConnection()


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
        """
        super().__init__()
        self.router = router
        self.agent = agent
        self.reactor = reactor
        self.timeouts = timeouts
        self.metrics = metrics
        self.access_log = access_log

    def render(self, request: Request) -> Any:
        """Forward ``request`` upstream; the response follows later.

        Args:
            request: The downstream request, whose body was read already.

        Returns:
            ``NOT_DONE_YET``.
        """
        rid = request_id_for(request.getHeader(b"x-request-id"))
        path = b"/" + b"/".join(request.postpath)
        request.content.seek(0)
        body = request.content.read()
        exchange = _Exchange(request, rid, path, self.reactor, self.metrics, self.access_log)
        exchange.record["bytes_in"] = len(body)
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
        base = route.pool.pick()
        exchange.upstream = base
        exchange.record.update(route=route.path_key, upstream=base)
        _, question, query = request.uri.partition(b"?")
        url = base.encode("utf-8") + path + question + query
        request.notifyFinish().addErrback(exchange.on_client_gone)

        headers = self._upstream_headers(request, rid)
        producer = _BytesProducer(body) if body else None
        if isinstance(self.agent, Egress):
            d = self.agent.request(request.method, url, headers, producer, route.pool.via)
        else:
            d = self.agent.request(request.method, url, headers, producer)
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
        return NOT_DONE_YET

    def _upstream_headers(self, request: Request, rid: str) -> Headers:
        """The headers to send upstream: end-to-end ones plus forwarding."""
        headers = Headers()
        for name, values in _end_to_end(request.requestHeaders, _REQUEST_OWN):
            headers.setRawHeaders(name, values)
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
            response.deliverBody(_StreamToClient(exchange))
            return
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
        request.defaultContentType = None
        exchange.body = _StreamToClient(exchange)
        response.deliverBody(exchange.body)

    def _failed(self, failure: Failure, exchange: _Exchange) -> None:
        exchange.pending = None
        if exchange.timer is not None:
            exchange.timer.cancel()
            exchange.timer = None
        if exchange.client_gone:
            if not failure.check(CancelledError):
                log.debug("request {request_id} failed after its client left",
                          request_id=exchange.rid)
            return
        status, code, message = self._classify(failure, exchange)
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
