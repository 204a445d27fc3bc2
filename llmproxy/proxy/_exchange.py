"""One proxied request, from its arrival to its one access record.

An :class:`Exchange` owns a request's whole life, in this order:

1. **admit and route**: the client's key (401); the pool for the path and
   the body's ``model`` (404 without one); the key's models (403), the
   rate limit and the budget, holding what the request may cost (429; 503
   when a shared store is down and ``on_store_error`` is ``deny``), which
   a shared store answers later; an alias's real model written into the
   body;
2. **attempts**: each try is an :class:`~llmproxy.proxy._attempt.Attempt`.
   A failure before the response's first byte moves on to another URL, a
   fallback model's pool or a short ``Retry-After``, as far as the route
   allows; otherwise the client gets an OpenAI-shaped error;
3. **stream**: the response goes to the client as it arrives;
4. **finish**: :meth:`Exchange.finish` runs exactly once, with the outcome:
   it settles the cost (:class:`~llmproxy.proxy._meter.Meter`), logs the
   access record, counts the metrics and
   tells the proxy resource the request is over.

A client that leaves finishes the exchange at once (``client_closed``) and
cancels whatever is under way upstream.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from llmproxy.egress import StaleConnectionRetried
from llmproxy.proxy._access import emit, new_record, note_response
from llmproxy.limits import Admission, Ask, KeyInfo
from llmproxy.proxy._admit import Refusal, bucket_of, identify, no_route, refusal_for
from llmproxy.proxy._attempt import Attempt
from llmproxy.proxy._body import Body
from llmproxy.proxy._errors import (
    ResponseHeaderTimeout,
    classify_failure,
    describe_failure,
    idle_before_body,
    reason_phrase,
    send_error,
)
from llmproxy.proxy._meter import Meter, ask_for
from llmproxy.proxy._headers import (
    ATTEMPTS_HEADER,
    copy_response_headers,
    header,
    undo_response_headers,
    upstream_headers,
)
from llmproxy.proxy._host import Host
from llmproxy.proxy._stream import StreamToClient
from llmproxy.proxy._usage_event import ask_stream_usage
from llmproxy.proxy._retries import Retries

log = Logger(namespace="llmproxy.proxy")


class Exchange:
    """One proxied request, from render to its access record.

    Attributes:
        request: The client's request.
        rid: Its request id.
        record: The access record's fields, filled in as the request goes.
        done: Whether :meth:`finish` ran (the client may still be sent the
            rest of a response that failed upstream).
        meter: The request's token usage and the key it counts against.
    """

    def __init__(
        self, proxy: Host, request: Request, rid: str, path: bytes,
        target: bytes, body: bytes,
    ) -> None:
        """Start following a request (nothing is sent yet: see :meth:`start`).

        Args:
            proxy: The proxy resource: its settings, whom to tell at the end.
            request: The client's request.
            rid: Its request id.
            path: The routed path, encoded.
            target: Path and query to append to an upstream's base URL.
            body: The request body as received.
        """
        self.proxy = proxy
        self.request = request
        self.rid = rid
        self.path = path
        self.target = target
        self.body = Body(body)
        self.started = proxy.clock.seconds()
        self.record = new_record(rid, request.method, path, len(body), proxy.worker)
        self.done = False
        self._gone = False
        self.meter = Meter(proxy.access_log or proxy.metrics is not None, proxy.prices)
        self._retries: Retries | None = None
        self._usage_asked = False
        self._attempt: Attempt | None = None
        self._retry_timer: Any = None
        self._stream: StreamToClient | None = None
        self._response: IResponse | None = None
        if proxy.metrics is not None:
            proxy.metrics.started()

    # -- admit and route ----------------------------------------------------

    def start(self) -> None:
        """Check the client's key, route, check its policy, then send."""
        guard = self.proxy.guard
        self.request.notifyFinish().addErrback(self._client_left)
        who = identify(guard, self.request, self.record)
        if isinstance(who, Refusal):
            self._refuse(who)
            return
        address, key = who
        route = self._route(key)
        if route is None:
            return
        limits = guard.limits
        if limits is None:
            self._go(route)
            return
        model = route.rewrite_model or self.record["model"]
        ask = ask_for(self.body, key, model) if key is not None else None
        admission = limits.admit(bucket_of(guard, address, key), key, ask)
        if isinstance(admission, Deferred):
            # A shared store answers later (within rate_limit.store_timeout).
            admission.addCallback(self._admitted, route, key, ask).addErrback(self.bug)
        else:
            self._admitted(admission, route, key, ask)

    def _route(self, key: KeyInfo | None) -> Any:
        """The request's route (None: answered 404), its model noted."""
        router = self.proxy.router
        policy = key is not None and (key.models is not None or key.budget is not None)
        model = self.body.model() if router.uses_model or policy else None
        self.record["model"] = model
        route = router.route(self.path, model)
        if route is None:
            self._refuse(no_route(self.path))
        else:
            self.record["route"] = route.path_key
        return route

    def _admitted(
        self, admission: Admission, route: Any, key: KeyInfo | None, ask: Ask | None
    ) -> None:
        limits = self.proxy.guard.limits
        assert limits is not None
        if self.done:
            limits.settle(admission.reservation, None)  # the client left meanwhile
            return
        refusal = refusal_for(admission.verdict, key, ask.model if ask is not None else None)
        if refusal is not None:
            self._refuse(refusal)
            return
        self.meter.admitted(limits, key, ask, admission.reservation)
        self._go(route)

    def _refuse(self, refusal: Refusal) -> None:
        if refusal.retry_after is not None:
            self.request.setHeader(b"retry-after", b"%d" % refusal.retry_after)
        self._answer_error(refusal.status, refusal.message, refusal.type, refusal.code)

    def _go(self, route: Any) -> None:
        """Send the request on its route (an alias's real model in the body)."""
        self._retries = Retries(
            self.proxy.router, route, self.rid, self.record, self.proxy.metrics
        )
        if route.rewrite_model is not None:
            self.body.set_model(route.rewrite_model)
            self.record["model"] = route.rewrite_model
        self._usage_asked = ask_stream_usage(
            self.body, self.path, route.pool.stream_usage or self.proxy.stream_usage,
            self.meter.key is not None,
        )
        self._send()

    # -- attempts ------------------------------------------------------------

    def _send(self, url: str | None = None) -> None:
        """Send the request to the pool's next URL (or to ``url``)."""
        self._retry_timer = None
        if self.done:
            return
        retries = self._retries
        assert retries is not None
        proxy, pool = self.proxy, retries.pool
        url = retries.next_url(url)
        attempt = self._attempt = Attempt(pool, url)
        self.meter.sent = True
        headers = upstream_headers(self.request, self.rid, pool, proxy.guard.keys is not None)
        if self._usage_asked:
            # The usage event is taken out of the stream: it must be plain.
            headers.setRawHeaders(b"accept-encoding", [b"identity"])
        agent = proxy.via_agents.get(pool.via, proxy.agent)
        sent = attempt.send(
            agent, self.request.method, url.encode("ascii") + self.target, headers,
            self.body.producer(), proxy.timeouts.response_header, proxy.clock,
        )
        sent.addCallbacks(self._headed, self._failed, callbackArgs=(attempt,),
                          errbackArgs=(attempt,))
        sent.addErrback(self.bug)

    def _another_try(self, attempt: Attempt, reason: str) -> bool:
        """Whether another upstream is left (a fallback model's, maybe)."""
        retries = self._retries
        assert retries is not None
        model = retries.model
        if not retries.another(attempt, reason):
            return False
        if retries.model != model:
            self.body.set_model(retries.model)
        return True

    def _headed(self, response: IResponse, attempt: Attempt) -> None:
        """The response head arrived: retry, wait, or pass it on."""
        retries = self._retries
        assert retries is not None
        if getattr(response, "retried", False):
            retries.stale_resend(attempt)
        if self.done:
            attempt.discard(response)
            return
        if response.code in attempt.pool.retry_on:
            retries.failed(attempt)
            if self._another_try(attempt, f"status {response.code}"):
                attempt.discard(response)
                self._send()
                return
            # Nobody else to ask: honour a short Retry-After, once.
            wait = retries.wait_for(response, self.proxy.max_retry_wait, attempt.url)
            if wait is not None:
                attempt.discard(response)
                self._retry_timer = self.proxy.clock.callLater(wait, self._send, attempt.url)
                return
        else:
            attempt.succeeded()
        self._respond(response)

    def _respond(self, response: IResponse) -> None:
        """Start the client's response with the upstream's head and body."""
        proxy = self.proxy
        content_type = header(response, b"content-type")
        note_response(self.record, response, content_type, self.elapsed_ms())
        self.meter.read(content_type, header(response, b"content-encoding"))
        self.request.setResponseCode(
            response.code, response.phrase or reason_phrase(response.code)
        )
        assert self._retries is not None
        copy_response_headers(response, self.request, self.rid, self._retries.attempts)
        drop = self._usage_asked and self.record["stream"]
        if drop:
            self.request.responseHeaders.removeHeader(b"content-length")
        self._response = response
        self._stream = StreamToClient(self, proxy.clock, proxy.timeouts.stream_idle, drop)
        response.deliverBody(self._stream)

    def _failed(self, failure: Failure, attempt: Attempt, classified: Any = None) -> None:
        """The attempt failed before the response's first byte."""
        retries = self._retries
        assert retries is not None
        if failure.check(StaleConnectionRetried):
            retries.stale_resend(attempt)
        attempt.end()
        self.meter.sent = False
        if self.done:
            if not failure.check(CancelledError):
                log.debug("request {request_id} failed after its client left",
                          request_id=self.rid)
            return
        status, code, message = classified or classify_failure(
            failure, attempt.url, self.proxy.timeouts
        )
        retries.failed(attempt)
        # Not retried after the header timeout: the client waited long enough.
        if not failure.check(ResponseHeaderTimeout) and self._another_try(attempt, message):
            self._send()
            return
        self.request.responseHeaders.setRawHeaders(ATTEMPTS_HEADER, [b"%d" % retries.attempts])
        log.warn("request {request_id} to {upstream} failed: {message}",
                 request_id=self.rid, upstream=attempt.url, message=message)
        self.record["error"] = message
        self._answer_error(status, message, "upstream_error", code)

    # -- stream --------------------------------------------------------------

    def body_done(self) -> None:
        """The response body ended whole: finish the client's response."""
        self._stream = None
        assert self._attempt is not None
        self._attempt.end()
        if self.done:
            return
        self.request.finish()
        self.finish("ok")

    def body_failed(self, reason: Failure, idled_out: bool) -> None:
        """The response body broke off upstream.

        Before any byte reached the client, that is still a failure before
        the first byte (retried like one); after, the client's connection is
        closed without the final chunk, so that it sees a truncated
        response, never a complete-looking one.
        """
        self._stream = None
        attempt = self._attempt
        assert attempt is not None and self._response is not None
        if not self.done and not self.request.startedWriting:
            undo_response_headers(self._response, self.request)
            self.record["status"] = None
            self.meter.forget()
            classified = None
            if idled_out:
                classified = idle_before_body(attempt.url, self.proxy.timeouts.stream_idle)
            self._failed(reason, attempt, classified)
            return
        attempt.end()
        if self.done:
            return
        log.warn(
            "upstream {upstream} broke off the response body of request "
            "{request_id}: {reason}",
            upstream=attempt.url, request_id=self.rid, reason=describe_failure(reason),
        )
        self.finish("upstream_aborted", "stream_idle" if idled_out else "upstream_aborted")
        self.request.loseConnection()

    # -- finish --------------------------------------------------------------

    def elapsed_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return round((self.proxy.clock.seconds() - self.started) * 1000.0, 3)

    def finish(self, outcome: str, error_code: str | None = None) -> None:
        """End the exchange, once: usage, access record, metrics.

        Args:
            outcome: ``ok``, ``error``, ``upstream_aborted`` or
                ``client_closed``.
            error_code: The error's code, for the record and the metrics.
        """
        if self.done:
            return
        self.done = True
        proxy, record = self.proxy, self.record
        record["outcome"] = outcome
        record["latency_ms"] = self.elapsed_ms()
        record["attempts"] = self._retries.attempts if self._retries is not None else 0
        if error_code is not None:
            record["error_code"] = error_code
        self.meter.settle(record, outcome)
        if proxy.access_log:
            emit(record)
        if proxy.metrics is not None:
            proxy.metrics.observe(record)
        proxy.finished(self)

    def _answer_error(self, status: int, message: str, type_: str, code: str) -> None:
        """Answer with an OpenAI-shaped error and finish."""
        self.record["status"] = status
        send_error(self.request, status, message, type_, code, self.rid)
        self.finish("error", code)

    def _client_left(self, reason: Failure) -> None:
        """The client closed its connection before we finished: stop paying."""
        self._gone = True
        if self.done:
            return
        self.finish("client_closed")
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._attempt is not None:
            self._attempt.cancel()
        if self._stream is not None:
            self._stream.stop()

    def bug(self, failure: Failure) -> None:
        """A bug in llmproxy: log it; answer 500 if nothing was sent yet."""
        log.failure("bug while proxying request {request_id}", failure, request_id=self.rid)
        request = self.request
        if self._gone or request.finished:
            return
        if not request.startedWriting:
            self.record["status"] = 500
            send_error(request, 500, "internal error in llmproxy", "server_error",
                       "internal_error", self.rid)
        else:
            request.loseConnection()
        self.finish("error", "internal_error")
