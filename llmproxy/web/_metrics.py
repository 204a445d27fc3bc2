"""``/metrics``: a Prometheus registry rendered off the reactor thread."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["MetricsResource"]

_log = Logger(namespace="llmproxy.web")


class MetricsResource(Resource):
    """Serves a registry in Prometheus' text format, rendered off the reactor.

    The format follows the scraper's ``Accept`` header
    (prometheus_client's ``choose_encoder``: Prometheus' text format by
    default, OpenMetrics when asked). Encoding runs every collector, which takes time proportional
    to the number of series, so it runs in the reactor's thread pool and the
    request is answered when it is done. A client that leaves first gets
    nothing written to its finished request.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, reactor: Any) -> None:
        """Serve ``registry``.

        Args:
            registry: The registry to expose.
            reactor: The reactor (an ``IReactorThreads``) whose thread pool
                renders the exposition.
        """
        super().__init__()
        self.registry = registry
        self.reactor = reactor

    def render_GET(self, request: Request) -> int:
        """Start rendering the registry; answer when it is ready.

        Args:
            request: The scrape.

        Returns:
            ``NOT_DONE_YET``: the response is written from a callback.
        """
        finished: list[bool] = []

        def gone(reason: Failure | None) -> None:
            # Fired once: by request.finish() or by the client leaving.
            finished.append(True)

        request.notifyFinish().addBoth(gone)

        def write(body: bytes) -> None:
            if finished:
                return
            request.setHeader(b"content-type", content_type.encode("ascii"))
            request.setHeader(b"content-length", b"%d" % (len(body),))
            request.write(body)
            request.finish()

        def failed(reason: Failure) -> None:
            _log.failure("Rendering /metrics failed", reason)
            if finished:
                return
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"metrics unavailable\n")
            request.finish()

        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else None)
        d = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), encoder, self.registry
        )
        d.addCallbacks(write, failed)
        d.addErrback(lambda reason: _log.failure("Answering /metrics failed", reason))
        return NOT_DONE_YET
