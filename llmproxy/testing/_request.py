"""The record of one request received by the fake upstream.

:class:`UpstreamRequest` lives here, below every other module of the
package, so that the replies and the exchange can use it without importing
:mod:`llmproxy.testing.upstream`, which re-exports it as its public name.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

__all__ = ["UpstreamRequest"]


@attrs.define(eq=False)
class UpstreamRequest:
    """One request received by a :class:`~llmproxy.testing.upstream.FakeUpstream`.

    Attributes:
        method: The request method.
        uri: Path and query as received.
        headers: A copy of the request headers.
        body: The request body.
        done: Fires with ``"finished"`` once the response was fully written,
            ``"disconnected"`` if the peer went away first, or ``"aborted"``
            when the fake aborted the connection itself. Never fails.
        bytes_sent: Body bytes written so far by ``X-Fake-Body-Bytes``.
        paused: Fires the first time the body producer is paused by the
            transport (backpressure); never fires otherwise.
    """

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    done: Deferred[str] = attrs.field(factory=Deferred)
    bytes_sent: int = 0
    paused: Deferred[None] = attrs.field(factory=Deferred)
