"""One proxied request's life.

:class:`ProxyResource` reads the (already size-limited) body, asks the
:class:`~llmproxy.routing.Router` where it goes, forwards it through
:class:`~llmproxy.egress.Egress` and streams the response back as it arrives: the upstream connection is the
downstream request's streaming producer, so a slow client pauses the
upstream socket instead of growing a buffer here. When the client leaves, the
upstream request is cancelled or its connection closed. Failures become
OpenAI-shaped JSON errors.
"""

from __future__ import annotations

from llmproxy.proxy._errors import (
    _WRAPPERS as _WRAPPERS,
    _causes as _causes,
    _describe_failure as _describe_failure,
    _is_tls_failure as _is_tls_failure,
    error_body,
    send_error as send_error,
)
from llmproxy.proxy._exchange import (
    ACCESS_FORMAT,
    Guard,
    _access as _access,
    _Discard as _Discard,
    _Exchange as _Exchange,
    _StreamToClient as _StreamToClient,
    _Watched as _Watched,
)
from llmproxy.proxy._headers import (
    _CREDENTIALS as _CREDENTIALS,
    _REQUEST_OWN as _REQUEST_OWN,
    HOP_BY_HOP as HOP_BY_HOP,
    _connection_tokens as _connection_tokens,
    _end_to_end as _end_to_end,
)
from llmproxy.proxy._resource import ProxyResource
from llmproxy.proxy._targets import (
    _DOT_SEGMENTS as _DOT_SEGMENTS,
    _MAX_REQUEST_ID as _MAX_REQUEST_ID,
    _PATH_SAFE as _PATH_SAFE,
    _QUERY_SAFE as _QUERY_SAFE,
    _bad_target as _bad_target,
    _retry_after as _retry_after,
    _safe_path as _safe_path,
    _safe_query as _safe_query,
    _with_model as _with_model,
    request_id_for,
)

__all__ = ["ACCESS_FORMAT", "Guard", "ProxyResource", "error_body", "request_id_for"]
