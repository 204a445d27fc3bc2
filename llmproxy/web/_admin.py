"""The admin resource: metrics, budgets, health and readiness.

Served on ``admin_listen`` (loopback by default), never on the public port:
``/readyz`` there lists every upstream's health, and ``/budgets`` every
named key's budget: used, reserved for requests in flight, and left, in
tokens or US dollars.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmproxy.web._metrics import MetricsResource
from llmproxy.web._root import HEALTH, RootResource, json_body

__all__ = ["build_admin_resource"]

log = Logger(namespace="llmproxy.web")


class _Health(Resource):
    """``/healthz`` or ``/readyz`` of the admin site."""

    isLeaf = True

    def __init__(self, root: RootResource, ready: bool) -> None:
        super().__init__()
        self._root = root
        self._ready = ready

    def render_GET(self, request: Request) -> bytes:
        if self._ready:
            return self._root.render_ready(request)
        return json_body(request, HEALTH)


class _Budgets(Resource):
    """``/budgets`` of the admin site: each named key's use and budget."""

    isLeaf = True

    def __init__(self, root: RootResource) -> None:
        super().__init__()
        self._root = root

    def render_GET(self, request: Request) -> Any:
        guard = self._root.proxy.guard
        keys = guard.keys.named() if guard.keys is not None else []
        limits = guard.limits
        rows: list[dict[str, Any]] = []
        asked: list[Deferred[Any]] = []
        for key in keys:
            row: dict[str, Any] = {"name": key.name, "key": key.id, "budget": None}
            rows.append(row)
            budget = key.budget
            if budget is None or limits is None:
                continue
            row["budget"] = budget.as_written()
            status = limits.status(key)
            if isinstance(status, Deferred):
                asked.append(status.addCallbacks(
                    row.update, lambda failure, row=row: row.update(error=_store_error(failure)),
                ))
            else:
                row.update(status)
        if not asked:
            return json_body(request, json.dumps({"keys": rows}).encode())
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        def answer(_: Any) -> None:
            if not gone:
                request.write(json_body(request, json.dumps({"keys": rows}).encode()))
                request.finish()

        gatherResults(asked).addCallback(answer).addErrback(
            lambda failure: log.failure("/budgets failed", failure)
        )
        return NOT_DONE_YET


def _store_error(failure: Any) -> str:
    return "store unavailable: " + " ".join(str(failure.value).split())[:200]


def build_admin_resource(root: RootResource, reactor: Any = None) -> Resource:
    """The admin site's root: ``/metrics``, ``/budgets``, ``/healthz`` and
    ``/readyz``.

    Args:
        root: The proxy's root resource (its metrics and readiness).
        reactor: Renders ``/metrics`` in its thread pool (default: the
            proxy's clock, which is the reactor).

    Returns:
        A resource to serve on the admin endpoint, never on the public one.
    """
    admin = Resource()
    if root.metrics is not None:
        admin.putChild(
            b"metrics", MetricsResource(root.metrics.registry, reactor or root.proxy.clock)
        )
    admin.putChild(b"budgets", _Budgets(root))
    admin.putChild(b"healthz", _Health(root, ready=False))
    admin.putChild(b"readyz", _Health(root, ready=True))
    return admin
