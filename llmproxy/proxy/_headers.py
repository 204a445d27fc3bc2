"""Which headers cross the proxy, and which stay on one connection."""

from __future__ import annotations

from twisted.web.http_headers import Headers

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

# Request headers the Agent writes itself from the request it sends.
_REQUEST_OWN = HOP_BY_HOP | {b"host", b"content-length", b"expect"}

#: Client credential headers: never forwarded when llmproxy checks keys or
#: the route has its own upstream key.
_CREDENTIALS = (b"authorization", b"x-api-key", b"api-key")

# What a request sent with llmproxy's (or no) credentials must not carry.
_REQUEST_OWN_AND_CREDENTIALS = _REQUEST_OWN | frozenset(_CREDENTIALS)


def _connection_tokens(headers: Headers) -> set[bytes]:
    """Header names listed in ``Connection`` (hop-by-hop by declaration)."""
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", ()):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def _end_to_end(headers: Headers, drop: frozenset[bytes] | set[bytes]) -> list:
    """The (name, values) pairs of ``headers`` that may cross the proxy."""
    extra = _connection_tokens(headers) if headers.hasHeader(b"connection") else ()
    return [
        (name, values)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in drop and name.lower() not in extra
    ]

