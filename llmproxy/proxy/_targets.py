"""The request's id and target: what is checked, encoded or rewritten.

Request ids, the request target's checks and encoding, and an upstream's
``Retry-After``.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote_from_bytes, unquote_to_bytes

from twisted.web.iweb import IResponse

from llmproxy.proxy._headers import header

_MAX_REQUEST_ID = 128


def request_id_for(given: bytes | None) -> str:
    """Return the request id to use for a request.

    Args:
        given: The client's ``X-Request-ID`` header, if any.

    Returns:
        The client's id, trimmed, when it is 1-128 printable ASCII
        characters; otherwise a new uuid4.
    """
    if given is not None:
        value = given.strip()
        if 0 < len(value) <= _MAX_REQUEST_ID and all(0x20 < c < 0x7F for c in value):
            return value.decode("ascii")
    return _uuid4()


def _uuid4() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())``.

    The random bytes come from ``os.urandom`` 256 UUIDs at a time (one
    system call instead of one per request); a forked child starts afresh.
    """
    global _random, _used
    if _used >= len(_random):
        _random, _used = os.urandom(16 * 256).hex(), 0
    h = _random[_used:_used + 32]
    _used += 32
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def _forget_random() -> None:
    global _random, _used
    _random, _used = "", 0


# Random hex digits not yet used for request ids, and how many were used.
_random, _used = "", 0
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_random)


# The variant bits (10xx) of a UUID's 17th hex digit.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


_DOT_SEGMENTS = frozenset({b".", b".."})


#: Rounds of percent-decoding checked; a segment still changing after
#: them is refused (no legitimate client encodes a path that deep).
_MAX_DECODES = 4


def _is_dot_segment(part: bytes) -> bool:
    """``.`` or ``..``, also with ``;`` parameters (Tomcat reads ``..;`` as
    ``..``)."""
    return part.partition(b";")[0] in _DOT_SEGMENTS


def bad_target(uri: bytes, segments: list[bytes]) -> str | None:
    """Why a request target must not be forwarded, or None if it is fine.

    Only origin-form targets (``/path?query``) are proxied: an absolute-form
    target (``http://elsewhere/``) is not a request for us, and ``.`` or
    ``..`` segments would let a client climb out of the route's base path
    upstream, however they are dressed: with ``;`` parameters (``..;``),
    percent-encoded any number of times (each round of decoding is
    checked), or behind an encoded slash or backslash.

    Args:
        uri: The request target as received.
        segments: The raw (still percent-encoded) path segments routed.
    """
    if not uri.startswith(b"/"):
        return "only origin-form request targets (/path) are accepted"
    path = uri.partition(b"?")[0]
    # find, not `in`: on CPython 3.11 `bytes in bytes` raises and clears a
    # TypeError each time.
    if path.find(b"/.") < 0 and path.find(b"%") < 0 and path.find(b"\\") < 0:
        return None  # no segment can be, or decode to, a dot segment
    for segment in segments:
        decoded = segment
        for _ in range(_MAX_DECODES + 1):
            parts = decoded.replace(b"\\", b"/").split(b"/")
            if any(_is_dot_segment(part) for part in parts):
                return "'.' and '..' path segments are not allowed"
            if decoded.find(b"%") < 0:
                break
            again = unquote_to_bytes(decoded)
            if again == decoded:
                break
            decoded = again
        else:
            return f"path segments percent-encoded more than {_MAX_DECODES} times are not allowed"
    return None


#: Bytes a path keeps as they are; anything else is percent-encoded, so an
#: upstream URL is always ASCII (existing %XX escapes are kept unchanged).
_PATH_SAFE = b"/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + b"?"


# What needs no encoding at all (the safe bytes plus letters and digits).
_PATH_OK = re.compile(b"[A-Za-z0-9" + re.escape(_PATH_SAFE) + b"]*")
_QUERY_OK = re.compile(b"[A-Za-z0-9" + re.escape(_QUERY_SAFE) + b"]*")


def safe_path(path: bytes) -> bytes:
    """Percent-encode bytes that may not appear raw in a URL path."""
    if _PATH_OK.fullmatch(path):
        return path
    return quote_from_bytes(path, safe=_PATH_SAFE).encode("ascii")


def safe_query(query: bytes) -> bytes:
    """Percent-encode bytes that may not appear raw in a URL query."""
    if _QUERY_OK.fullmatch(query):
        return query
    return quote_from_bytes(query, safe=_QUERY_SAFE).encode("ascii")


def upstream_retry_after(response: IResponse) -> float | None:
    """An upstream's Retry-After in seconds, if it sent a number."""
    value = header(response, b"retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None
