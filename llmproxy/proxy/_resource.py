"""The proxy resource: render, the requests in flight, and drain."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmproxy.config import TimeoutsConfig
from llmproxy.limits import Prices
from llmproxy.metrics import Metrics
from llmproxy.proxy._errors import send_error
from llmproxy.proxy._admit import Guard
from llmproxy.proxy._exchange import Exchange
from llmproxy.proxy._targets import bad_target, request_id_for, safe_path, safe_query
from llmproxy.routing import Router

log = Logger(namespace="llmproxy.proxy")


class ProxyResource(Resource):
    """Forwards every request to the upstream its route names.

    The routed path is the part of the request path below the resource:
    ``/chat/completions`` whether the resource is the site root or mounted
    under ``/llm/``. Each request's life is an
    :class:`~llmproxy.proxy._exchange.Exchange`; this resource starts them
    and knows which are in flight, for a graceful stop.

    Attributes:
        router: Chooses the upstream pool for each request.
        agent: Sends requests upstream (any ``IAgent``).
        clock: Schedules timeouts and measures latency.
        timeouts: Time limits.
        metrics: Where finished requests are counted, if anywhere.
        access_log: Whether to log an access record per request.
        guard: Client addresses, keys and rate limits.
        max_retry_wait: Longest upstream Retry-After honoured when no
            other upstream is left.
        via_agents: The agents for routes that force their way out
            (``via: direct`` or ``proxy``); ``agent`` for any other.
        worker: The worker number put in access records (several workers).
        stream_usage: When to ask an OpenAI stream for its usage
            (``stream_usage``): ``budget``, ``always`` or ``never``; a
            route's own setting wins.
        prices: What models cost, for each record's ``cost_usd`` (None: no
            prices).
        inflight: The requests being served now.
    """

    isLeaf = True

    def __init__(
        self,
        router: Router,
        agent: IAgent,
        clock: IReactorTime,
        timeouts: TimeoutsConfig,
        metrics: Metrics | None = None,
        access_log: bool = True,
        guard: Guard | None = None,
        max_retry_wait: float = 2.0,
        via_agents: Mapping[str, IAgent] | None = None,
        worker: int | None = None,
        stream_usage: str = "budget",
        prices: Prices | None = None,
    ) -> None:
        """Set up the proxy (see the class's attributes)."""
        super().__init__()
        self.router = router
        self.agent = agent
        self.clock = clock
        self.timeouts = timeouts
        self.metrics = metrics
        self.access_log = access_log
        self.guard = guard or Guard()
        self.max_retry_wait = max_retry_wait
        self.via_agents = dict(via_agents or {})
        self.worker = worker
        self.stream_usage = stream_usage
        self.prices = prices
        self.inflight: set[Exchange] = set()
        self._drained: list[Deferred[None]] = []

    def render(self, request: Request) -> Any:
        """Forward ``request`` upstream; the response follows later.

        Args:
            request: The client's request, whose body was read already.

        Returns:
            ``NOT_DONE_YET``.
        """
        rid = request_id_for(request.getHeader(b"x-request-id"))
        try:
            self._start(request, rid)
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

    def _start(self, request: Request, rid: str) -> None:
        # twisted.web unquotes postpath: route and forward the raw path.
        raw = (
            request.path.split(b"/")[1 + len(request.prepath):]
            if request.path[:1] == b"/" else []
        )
        problem = bad_target(request.uri, raw)
        if problem is not None:
            send_error(request, 400, problem, "invalid_request_error", "invalid_path", rid)
            return
        path = safe_path(b"/" + b"/".join(raw))
        _, question, query = request.uri.partition(b"?")
        request.content.seek(0)
        body = request.content.read()
        exchange = Exchange(self, request, rid, path, path + question + safe_query(query), body)
        self.inflight.add(exchange)
        try:
            exchange.start()
        except Exception:
            exchange.bug(Failure())

    def finished(self, exchange: Exchange) -> None:
        """``exchange`` is over: forget it (firing :meth:`drain` waits)."""
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
