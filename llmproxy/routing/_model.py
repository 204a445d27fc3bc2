"""Finding a JSON body's top-level ``model`` without building the document.

``json.loads`` on a request body builds every object in it: a 32 MiB body of
tiny objects took the daemon from 66 MB to over 900 MB and held the reactor
for more than a second. :func:`extract_model` instead looks only for the
member ``"model"`` of the top-level object, with byte operations that run in
C (``bytes.replace``, ``bytes.find``, ``bytes.count`` and one ``re.sub`` per
candidate), so its work is linear in the body's size and its memory a small
multiple of it. Only the one string value found is decoded.

The body is not validated as JSON (the upstream does that): a body that
starts as a JSON object with a top-level string ``model`` routes by it even
if something later in it is malformed. Each occurrence of ``"model"``
costs a little Python work, so only the first :data:`MAX_CANDIDATES` are
looked at: no real request names ``model`` that often, and a body that
does is routed by its path alone.
"""

from __future__ import annotations

import json
import re

__all__ = ["extract_model"]

# Placeholders for escaped backslashes and quotes: the same length, so that
# positions in the copy are positions in the body, and neither a quote nor a
# bracket, so that only real string delimiters and structure are left.
_ESCAPED_BACKSLASH = (b"\\\\", b"__")
_ESCAPED_QUOTE = (b'\\"', b"__")

_KEY = b'"model"'
#: Occurrences of ``"model"`` looked at, at most.
MAX_CANDIDATES = 1000
_LEADING_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_scanstring = json.decoder.scanstring
# Structure only: quotes and brackets, "[" counted as "{" and "]" as "}".
_BRACKETS_AS_BRACES = bytes.maketrans(b"[]", b"{}")
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"{}[]'))


def _skeleton(segment: bytes) -> bytes:
    """``segment``'s quotes and brackets only (``[`` as ``{``, ``]`` as ``}``)."""
    return segment.translate(_BRACKETS_AS_BRACES, _NOT_STRUCTURE)


def _depth_change(skeleton: bytes) -> int:
    """Brackets opened minus brackets closed outside strings.

    ``skeleton`` (see :func:`_skeleton`) starts outside any string and holds
    whole strings only. Dropping every pair of adjacent quotes changes no
    bracket's inside-or-outside parity, and leaves quotes only around
    strings that contain brackets: rare, and split apart here.
    """
    skeleton = skeleton.replace(b'""', b"")
    if skeleton.find(b'"') >= 0:
        skeleton = b"".join(skeleton.split(b'"')[::2])
    return skeleton.count(b"{") - skeleton.count(b"}")


def _string_at(body: bytes, start: int) -> str | None:
    """The JSON string value starting at ``body[start]``, if there is one."""
    if body[start:start + 1] != b'"':
        return None
    end = body.find(b'"', start + 1)
    # Find the closing quote: one not escaped by an odd run of backslashes.
    while end >= 0:
        backslashes = 0
        while body[end - 1 - backslashes] == 0x5C:  # "\\"
            backslashes += 1
        if backslashes % 2 == 0:
            break
        end = body.find(b'"', end + 1)
    if end < 0:
        return None
    try:
        text = body[start:end + 1].decode("utf-8")
        value, _ = _scanstring(text, 1)
    except (UnicodeDecodeError, ValueError):
        return None
    return value


def extract_model(body: bytes) -> str | None:
    """Read the ``model`` of a JSON request body without changing the body.

    Args:
        body: The request body as received.

    Returns:
        The string value of the top-level object's ``model`` member (the
        last one, as ``json.loads`` would take, when it appears twice), or
        None when the body is not a JSON object or has no such member
        (multipart uploads, for example). A ``model`` inside a nested object
        or inside a string never counts.
    """
    start = _LEADING_WHITESPACE.match(body).end()
    if body[start:start + 1] != b"{":
        return None
    candidate = body.find(_KEY, start)
    if candidate < 0:
        return None
    if body.find(b"\\", start) >= 0:
        neutral = body.replace(*_ESCAPED_BACKSLASH).replace(*_ESCAPED_QUOTE)
        candidate = neutral.find(_KEY, start)
    else:
        neutral = body  # no escapes: every quote is a delimiter already
    found: str | None = None
    # Walk the candidates left to right, keeping a position known to be
    # outside any string and the bracket depth there: each byte is looked at
    # a bounded number of times.
    pos, depth, looked = start, 0, 0
    while candidate >= 0:
        looked += 1
        if looked > MAX_CANDIDATES:
            return None
        skeleton = _skeleton(neutral[pos:candidate])
        if skeleton.count(b'"') % 2:
            # Inside a string (only in a body that is not JSON): resume after
            # that string's closing quote.
            close = neutral.find(b'"', candidate)
            if close < 0:
                break
            depth += _depth_change(_skeleton(neutral[pos:close + 1]))
            pos = close + 1
            candidate = neutral.find(_KEY, pos)
            continue
        depth += _depth_change(skeleton)
        pos = candidate + len(_KEY)
        if depth == 1:
            colon = pos
            while neutral[colon:colon + 1] in (b" ", b"\t", b"\r", b"\n"):
                colon += 1
            if neutral[colon:colon + 1] == b":":
                value_at = colon + 1
                while neutral[value_at:value_at + 1] in (b" ", b"\t", b"\r", b"\n"):
                    value_at += 1
                value = _string_at(body, value_at)
                found = value
        candidate = neutral.find(_KEY, pos)
    return found
