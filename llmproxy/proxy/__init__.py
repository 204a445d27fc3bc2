"""One proxied request's life.

:class:`ProxyResource` is the twisted.web resource that forwards requests:
for each it starts an :class:`Exchange`, which admits it (keys, rate limit,
budget), routes it, sends it through an ``IAgent`` (a try per upstream, each
an :class:`Attempt`) and streams the response back as it arrives, with the
upstream connection as the client's streaming producer. Failures become
OpenAI-shaped JSON errors (:func:`send_error`, :func:`error_body`).
"""

from __future__ import annotations

from llmproxy.proxy._access import ACCESS_FORMAT
from llmproxy.proxy._attempt import Attempt
from llmproxy.proxy._errors import error_body, reason_phrase, send_error, write_raw_error
from llmproxy.proxy._admit import Guard
from llmproxy.proxy._exchange import Exchange
from llmproxy.proxy._headers import HOP_BY_HOP
from llmproxy.proxy._resource import ProxyResource
from llmproxy.proxy._stream import Watched
from llmproxy.proxy._body import Body, with_model
from llmproxy.proxy._targets import request_id_for
from llmproxy.proxy._usage import Usage, UsageReader

__all__ = [
    "ACCESS_FORMAT",
    "HOP_BY_HOP",
    "Attempt",
    "Body",
    "Exchange",
    "Guard",
    "ProxyResource",
    "Usage",
    "UsageReader",
    "Watched",
    "error_body",
    "reason_phrase",
    "request_id_for",
    "send_error",
    "with_model",
    "write_raw_error",
]
