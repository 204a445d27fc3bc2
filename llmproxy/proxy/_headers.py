"""Which headers cross the proxy, and the headers of each side's message.

:func:`upstream_headers` builds a request's headers for the upstream: the
client's end-to-end headers, the route's credential, and the forwarding
headers llmproxy writes itself. :func:`copy_response_headers` puts an
upstream response's head on the client's response, and
:func:`undo_response_headers` takes it off again when the body fails before
its first byte reached the client.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from llmproxy.routing import UpstreamPool

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

#: Request headers the Agent writes itself from the request it sends.
_REQUEST_OWN = HOP_BY_HOP | {b"host", b"content-length", b"expect"}

#: Client credential headers: never forwarded when llmproxy checks keys or
#: the route has its own upstream key.
CREDENTIALS = (b"authorization", b"x-api-key", b"api-key")

# What a request sent with llmproxy's (or no) credentials must not carry.
_REQUEST_OWN_AND_CREDENTIALS = _REQUEST_OWN | frozenset(CREDENTIALS)

# Forwarding headers llmproxy writes itself (a client's X-Forwarded-For is
# extended, not copied).
_FORWARDING = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"))

# Response headers llmproxy writes itself (as nginx does): its own Server
# and Date, never the upstream's.
_RESPONSE_OWN = HOP_BY_HOP | {b"server", b"date"}

#: The response header saying how many upstream attempts a request took.
ATTEMPTS_HEADER = b"x-llmproxy-upstream-attempts"


def _connection_tokens(headers: Headers) -> set[bytes]:
    """Header names listed in ``Connection`` (hop-by-hop by declaration)."""
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", ()):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def end_to_end(
    headers: Headers, drop: Iterable[bytes]
) -> list[tuple[bytes, list[bytes]]]:
    """The (name, values) pairs of ``headers`` that may cross the proxy.

    Args:
        headers: A message's headers.
        drop: Lower-case names never passed on (besides those ``Connection``
            lists).

    Returns:
        The pairs, in the order of ``headers``.
    """
    if headers.hasHeader(b"connection"):
        drop = set(drop) | _connection_tokens(headers)
    return [
        (name, values) for name, values in headers.getAllRawHeaders()
        if name.lower() not in drop
    ]


def upstream_headers(
    request: Request, rid: str, pool: UpstreamPool, keys_checked: bool
) -> Headers:
    """The headers to send upstream: end-to-end ones plus forwarding.

    Args:
        request: The client's request.
        rid: Its request id.
        pool: The upstream pool (its ``api_key`` and ``auth_header``).
        keys_checked: llmproxy checked the client's key, so the client's
            credential stays here.

    Returns:
        New headers; Host and Content-Length are the agent's to write.
    """
    api_key, auth_header = pool.api_key, pool.auth_header
    if keys_checked or api_key is not None or auth_header == "none":
        drop = _REQUEST_OWN_AND_CREDENTIALS
    else:
        drop = _REQUEST_OWN
    headers = Headers()
    forwarded: list[bytes] = []
    for name, values in end_to_end(request.requestHeaders, drop):
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
    headers.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
    headers.setRawHeaders(b"x-request-id", [rid.encode("ascii")])
    return headers


def header(response: IResponse, name: bytes) -> bytes | None:
    """The first value of a response's header ``name`` (lower case), if any."""
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def copy_response_headers(
    response: IResponse, request: Request, rid: str, attempts: int
) -> None:
    """Put an upstream response's head on the client's response.

    End-to-end headers are copied, except ``Server`` and ``Date``, which
    are llmproxy's own (as with nginx); a known length is kept (Twisted's client
    keeps Content-Length out of ``response.headers`` except for HEAD), so
    that a body cut short upstream is visibly short for the client too.

    Args:
        response: The upstream's response.
        request: The client's request.
        rid: The request id.
        attempts: Upstream attempts made, for :data:`ATTEMPTS_HEADER`.
    """
    out = request.responseHeaders
    for name, values in end_to_end(response.headers, _RESPONSE_OWN):
        out.setRawHeaders(name, values)
    if (
        response.length is not UNKNOWN_LENGTH
        and request.method != b"HEAD"
        and response.code not in NO_BODY_CODES
    ):
        out.setRawHeaders(b"content-length", [b"%d" % response.length])
    out.setRawHeaders(b"x-request-id", [rid.encode("ascii")])
    out.setRawHeaders(ATTEMPTS_HEADER, [b"%d" % attempts])
    request.defaultContentType = None


def undo_response_headers(response: IResponse, request: Request) -> None:
    """Take :func:`copy_response_headers`' upstream headers off again.

    Args:
        response: The upstream's response whose head was copied.
        request: The client's request, not yet written to.
    """
    out = request.responseHeaders
    for name, _ in end_to_end(response.headers, _RESPONSE_OWN):
        out.removeHeader(name)
    out.removeHeader(b"content-length")
    out.removeHeader(ATTEMPTS_HEADER)
