"""The access record: one log event per request, and what it starts from.

:func:`new_record` gives the fields every record has; :func:`emit` logs a
finished one in the ``llmproxy.access`` namespace, where the JSON file and
the console observer find it (``logs`` gives both a fast path for it).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger, LogLevel
from twisted.web.iweb import IResponse

from llmproxy.logs import ACCESS_NAMESPACE

_access = Logger(namespace=ACCESS_NAMESPACE)

#: The access record's format for readable (console) output.
ACCESS_FORMAT = (
    "{method} {path} {status} {outcome} {latency_ms}ms model={model} "
    "upstream={upstream} egress={egress} request_id={request_id}"
)


def new_record(
    rid: str, method: bytes, path: bytes, bytes_in: int = 0, worker: int | None = None
) -> dict[str, Any]:
    """The fields of a request's access record before anything happened.

    Args:
        rid: The request id.
        method: The request method.
        path: The routed path.
        bytes_in: The request body's size.
        worker: The worker serving it (several workers), if any.

    Returns:
        A record to fill in as the request goes.
    """
    record: dict[str, Any] = {
        "request_id": rid,
        "client_ip": None,
        "method": method.decode("ascii", "replace"),
        "path": path.decode("utf-8", "replace"),
        "route": None,
        "model": None,
        "upstream": None,
        "status": None,
        "bytes_in": bytes_in,
        "bytes_out": 0,
        "stream": False,
        "ttfb_ms": None,
        "egress": None,
        "address": None,
    }
    if worker is not None:
        record["worker"] = worker
    return record


def note_response(
    record: dict[str, Any], response: IResponse, content_type: bytes | None, ttfb_ms: float
) -> None:
    """Note the upstream response's head in the record.

    Args:
        record: The access record.
        response: The response (its egress and address when an
            :class:`~llmproxy.egress.Egress` sent it).
        content_type: Its Content-Type, if any.
        ttfb_ms: Milliseconds from the request to the head.
    """
    record["status"] = response.code
    record["ttfb_ms"] = ttfb_ms
    record["egress"] = getattr(response, "egress", None)
    record["address"] = getattr(response, "address", None)
    record["stream"] = bool(content_type) and content_type.lower().startswith(
        b"text/event-stream"
    )


def emit(record: dict[str, Any]) -> None:
    """Log a finished request's record (once per request).

    The event is what ``Logger.info`` would emit, built directly.

    Args:
        record: The record's fields.
    """
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
