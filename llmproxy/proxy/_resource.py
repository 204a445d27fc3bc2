"""The proxy resource: routing, attempts, retries and upstream failures."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmproxy.config import TimeoutsConfig
from llmproxy.egress import Egress, RoutedResponse
from llmproxy.limits import client_ip, presented_key, retry_after
from llmproxy.limits._store import ALLOWED, OK, OVER_BUDGET, RATE_LIMITED, Verdict
from llmproxy.metrics import Metrics
from llmproxy.proxy._errors import classify_failure, reason_phrase, send_error
from llmproxy.proxy._exchange import (
    Guard,
    _Discard,
    _Exchange,
    _StreamToClient,
)
from llmproxy.proxy._headers import (
    _REQUEST_OWN,
    _REQUEST_OWN_AND_CREDENTIALS,
    HOP_BY_HOP,
    _end_to_end,
)
from llmproxy.proxy._targets import (
    _bad_target,
    _retry_after,
    _safe_path,
    _safe_query,
    _with_model,
    request_id_for,
)
from llmproxy.proxy._usage import UsageReader
from llmproxy.routing import Router, UpstreamPool, extract_model

# The package's namespace, as before the split into modules.
log = Logger(namespace="llmproxy.proxy")

# Forwarding headers llmproxy writes itself (a client's X-Forwarded-For is
# extended, not copied).
_FORWARDING = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"))


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
        egress: Egress,
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
            egress: Sends requests upstream (honouring each route's
                ``via``).
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
        self.egress = egress
        self.reactor = reactor
        self.timeouts = timeouts
        self.metrics = metrics
        self.access_log = access_log
        self.guard = guard or Guard()
        self.max_retry_wait = max_retry_wait
        #: The worker number put in access records (several workers only).
        self.worker: int | None = None
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
        try:
            self._forward(request, rid)
        except Exception:
            # A bug: the client gets an OpenAI-shaped 500, not twisted.web's
            # HTML traceback page, and the daemon goes on.
            log.failure("bug while handling request {request_id}", request_id=rid)
            if not request.startedWriting and not request.finished:
                send_error(request, 500, "internal error in llmproxy", "server_error",
                           "internal_error", rid)
            elif not request.finished:
                request.loseConnection()
        return NOT_DONE_YET

    def _forward(self, request: Request, rid: str) -> None:
        """Check, route and send one request (the body of :meth:`render`)."""
        # twisted.web unquotes postpath; route and forward the raw path.
        raw = request.path.split(b"/")[1 + len(request.prepath):] if request.path[:1] == b"/" else []
        path = _safe_path(b"/" + b"/".join(raw))
        problem = _bad_target(request.uri, raw)
        if problem is not None:
            send_error(request, 400, problem, "invalid_request_error", "invalid_path", rid)
            return
        request.content.seek(0)
        body = request.content.read()
        exchange = _Exchange(request, rid, path, self.reactor, self.metrics, self.access_log)
        if self.worker is not None:
            exchange.record["worker"] = self.worker
        peer = getattr(request.getClientAddress(), "host", None)
        client = client_ip(peer, request.requestHeaders, self.guard.trusted)
        exchange.record["client_ip"] = client
        exchange.record["bytes_in"] = len(body)
        verdict = self._admit(request, exchange, client)
        if verdict is None:
            return
        if isinstance(verdict, Deferred):
            # A shared store answers later (within rate_limit.store_timeout).
            request.notifyFinish().addErrback(exchange.on_client_gone)
            verdict.addCallback(self._admitted, exchange, path, body, True)
            verdict.addErrback(self._bug, exchange)
            return
        self._admitted(verdict, exchange, path, body)

    def _admitted(
        self, verdict: Verdict, exchange: _Exchange, path: bytes, body: bytes,
        waited: bool = False,
    ) -> None:
        """Route and send a request the limits let through (or refuse it)."""
        if exchange.client_gone:
            return
        request = exchange.request
        if verdict.outcome != OK:
            self._refuse(verdict, exchange)
            return
        router = self.router
        model = extract_model(body) if router.uses_model else None
        exchange.record["model"] = model
        route = router.route(path, model)
        if route is None:
            exchange.record["status"] = 404
            send_error(
                request,
                404,
                f"no route for path {path.decode('utf-8', 'replace')!r}",
                "invalid_request_error",
                "route_not_found",
                exchange.rid,
            )
            exchange.log_done("error")
            return
        exchange.record["route"] = route.path_key
        _, question, query = request.uri.partition(b"?")
        exchange.path, exchange.query = path, question + _safe_query(query)
        exchange.body_sent = body
        exchange.pool = route.pool
        exchange.fallbacks = list(route.fallbacks)
        if route.rewrite_model is not None:
            self._switch_model(exchange, route.rewrite_model, body)
        if not waited:
            request.notifyFinish().addErrback(exchange.on_client_gone)
        self.inflight.add(exchange)
        exchange.on_done = self._done
        self._attempt(exchange)

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
        headers = self._upstream_headers(request, exchange.rid, pool)
        exchange.timer = self.reactor.callLater(
            self.timeouts.response_header, self._headers_timed_out, exchange
        )
        d = self.egress.request(
            request.method, url, exchange.path + exchange.query, headers,
            exchange.body_sent, pool.via,
        )
        # The callbacks may run at once (a failure found before anything was
        # sent, even a retry that starts the next attempt): they clear
        # exchange.pending, so it is set first.
        exchange.pending = d
        d.addCallbacks(
            self._got_response, self._failed, callbackArgs=(exchange,), errbackArgs=(exchange,)
        )

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

    def _admit(
        self, request: Request, exchange: _Exchange, client: str | None
    ) -> Verdict | Deferred[Verdict] | None:
        """Check the client's key (401 if refused), then ask the limits.

        Returns:
            None when refused already, else the limits' verdict (a Deferred
            with a shared store).
        """
        guard = self.guard
        key = None
        if guard.keys is not None:
            key = guard.keys.lookup(presented_key(request.requestHeaders))
            if key is None:
                exchange.record["status"] = 401
                send_error(
                    request, 401,
                    "a valid API key is required (Authorization: Bearer KEY or x-api-key)",
                    "invalid_request_error", "invalid_api_key", exchange.rid,
                )
                exchange.log_done("error", "invalid_api_key")
                return None
            exchange.record["client_key"] = key.id
            if key.name is not None:
                exchange.record["key_name"] = key.name
        limits = guard.limits
        if limits is None:
            return ALLOWED
        if key is not None and key.budget is not None:
            exchange.key, exchange.limits = key, limits
        bucket = key.id if guard.limit_by_key and key is not None else (client or "unknown")
        return limits.check(bucket, key)

    def _refuse(self, verdict: Verdict, exchange: _Exchange) -> None:
        """Answer 429 (rate limit, budget) or 503 (store down, deny)."""
        request = exchange.request
        seconds = retry_after(verdict.wait)
        request.responseHeaders.setRawHeaders(b"retry-after", [b"%d" % seconds])
        if verdict.outcome == RATE_LIMITED:
            status, message, type_, code = (
                429, f"rate limit exceeded: retry in {seconds} s", "rate_limit_error",
                "rate_limited",
            )
            if self.metrics is not None:
                self.metrics.rate_limited.inc()
        elif verdict.outcome == OVER_BUDGET:
            status, message, type_, code = (
                429, f"the token budget of key {exchange.key.name!r} is spent: it "
                f"renews in {seconds} s", "insufficient_quota", "insufficient_quota",
            )
        else:
            status, message, type_, code = (
                503, "the rate limit store is not answering; try again shortly",
                "server_error", "limit_store_unavailable",
            )
        exchange.record["status"] = status
        send_error(request, status, message, type_, code, exchange.rid)
        exchange.log_done("error", code)

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

    def _upstream_headers(self, request: Request, rid: str, pool: UpstreamPool) -> Headers:
        """The headers to send upstream: end-to-end ones plus forwarding."""
        api_key, auth_header = pool.api_key, pool.auth_header
        if self.guard.keys is not None or api_key is not None or auth_header == "none":
            drop = _REQUEST_OWN_AND_CREDENTIALS
        else:
            drop = _REQUEST_OWN
        headers = Headers()
        forwarded: list[bytes] = []
        for name, values in _end_to_end(request.requestHeaders, drop):
            lower = name.lower()
            if lower == b"x-forwarded-for":
                forwarded = list(values)
            elif lower not in _FORWARDING:
                headers.setRawHeaders(name, values)
        if api_key is not None and auth_header != "none":
            value = api_key.encode("utf-8")
            if auth_header == "bearer":
                headers.setRawHeaders(b"authorization", [b"Bearer " + value])
            else:
                headers.setRawHeaders(auth_header.encode("ascii"), [value])
        host = getattr(request.getClientAddress(), "host", None)
        if host:
            forwarded.append(host.encode("ascii"))
        if forwarded:
            headers.setRawHeaders(b"x-forwarded-for", [b", ".join(forwarded)])
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

    def _got_response(self, response: RoutedResponse, exchange: _Exchange) -> None:
        try:
            self._respond(response, exchange)
        except Exception:
            self._bug(Failure(), exchange)

    def _respond(self, response: RoutedResponse, exchange: _Exchange) -> None:
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
        record["egress"] = response.egress
        record["address"] = response.address
        content_type = response.header(b"content-type")
        record["stream"] = bool(content_type) and content_type.lower().startswith(
            b"text/event-stream"
        )
        if exchange.access_log or exchange.metrics is not None or exchange.key is not None:
            exchange.usage = UsageReader(content_type, response.header(b"content-encoding"))
        request.setResponseCode(response.code, response.phrase or reason_phrase(response.code))
        out = request.responseHeaders
        exchange.upstream_headers = response.headers
        for name, values in _end_to_end(response.headers, HOP_BY_HOP):
            out.setRawHeaders(name, values)
        # Twisted's client keeps Content-Length out of response.headers
        # (except for HEAD, where it is the entity's): a known length is
        # kept, so that a body cut short upstream is visibly short for the
        # client too.
        if (
            response.length is not UNKNOWN_LENGTH
            and request.method != b"HEAD"
            and response.code not in NO_BODY_CODES
        ):
            out.setRawHeaders(b"content-length", [b"%d" % response.length])
        out.setRawHeaders(b"x-request-id", [exchange.rid.encode("ascii")])
        out.setRawHeaders(b"x-llmproxy-upstream-attempts", [b"%d" % exchange.attempts])
        request.defaultContentType = None
        exchange.body = _StreamToClient(
            exchange, self.reactor, self.timeouts.stream_idle, self._failed_before_body
        )
        response.deliverBody(exchange.body)

    def _failed(self, failure: Failure, exchange: _Exchange) -> None:
        try:
            self._fail(failure, exchange)
        except Exception:
            self._bug(Failure(), exchange)

    def _failed_before_body(self, exchange: _Exchange, reason: Failure, idled_out: bool) -> None:
        """The head came, then the body failed before any byte reached the
        client: a failure before the first byte (retried, or an error)."""
        try:
            out = exchange.request.responseHeaders
            for name, _ in _end_to_end(exchange.upstream_headers, HOP_BY_HOP):
                out.removeHeader(name)
            for name in (b"content-length", b"x-llmproxy-upstream-attempts"):
                out.removeHeader(name)
            exchange.record["status"] = None
            exchange.usage = None
            classified = None
            if idled_out:
                classified = (504, "upstream_timeout", (
                    f"upstream {exchange.upstream} sent its response head, then no "
                    f"body byte for {self.timeouts.stream_idle:g} s"
                ))
            self._fail(reason, exchange, classified)
        except Exception:
            self._bug(Failure(), exchange)

    def _fail(
        self,
        failure: Failure,
        exchange: _Exchange,
        classified: tuple[int, str, str] | None = None,
    ) -> None:
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
        status, code, message = classified or classify_failure(
            failure, exchange.upstream, exchange.timed_out, self.timeouts
        )
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

    def _bug(self, failure: Failure, exchange: _Exchange) -> None:
        log.failure(
            "bug while proxying request {request_id}",
            failure,
            request_id=exchange.rid,
        )
        if not exchange.client_gone and not exchange.request.finished:
            exchange.request.loseConnection()
