"""A JSON body's top-level members, found without building the document.

``json.loads`` on a request body builds every object in it: a 32 MiB body of
tiny objects took the daemon from 66 MB to over 900 MB and held the reactor
for more than a second. :func:`find_members` instead looks only for the
members it is asked for (``"model"``, say) of the top-level object, with
byte operations that run in C (``bytes.replace``, ``bytes.find``,
``bytes.translate``, ``bytes.count``, a regular expression's search), so its
work is linear in the body's size and its memory a small multiple of it.
It gives where each member's value lies; :func:`extract_model` decodes the
one string the router needs, and :func:`replace_value` rewrites a value in
place, leaving every other byte the client sent as it was.

The body is not validated as JSON (the upstream does that): a body that
starts as a JSON object with a top-level string ``model`` routes by it even
if something later in it is malformed. As ``json.loads`` would, the last of
repeated keys counts. Each occurrence of a key costs a little Python work,
so only the first :data:`MAX_CANDIDATES` are looked at: no real request
names its keys that often, and a body that does is treated as having none.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import attrs

__all__ = [
    "MAX_CANDIDATES",
    "Member",
    "extract_model",
    "find_members",
    "replace_value",
    "string_value",
]

# Placeholders for escaped backslashes and quotes: the same length, so that
# positions in the copy are positions in the body, and neither a quote nor a
# bracket, so that only real string delimiters and structure are left.
_ESCAPED_BACKSLASH = (b"\\\\", b"__")
_ESCAPED_QUOTE = (b'\\"', b"__")

#: Occurrences of the keys looked for, at most.
MAX_CANDIDATES = 1000
#: Bytes of an object or array value scanned for its end, at most.
MAX_CONTAINER = 64 * 1024
_WHITESPACE = b" \t\r\n"
_LEADING_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_SCALAR = re.compile(rb"-?[0-9][0-9.eE+-]*|true|false|null")
_CONTAINER_PART = re.compile(rb'["{}\[\]]')
_scanstring = json.decoder.scanstring
# Structure only: quotes and brackets, "[" counted as "{" and "]" as "}".
_BRACKETS_AS_BRACES = bytes.maketrans(b"[]", b"{}")
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"{}[]'))


@attrs.frozen
class Member:
    """Where a member's value lies in a body.

    Attributes:
        start: The index of the value's first byte.
        end: The index just past its last byte; None when its end was not
            found (an unterminated string, an object or array longer than
            :data:`MAX_CONTAINER`, or no value at all).
    """

    start: int
    end: int | None

    def raw(self, body: bytes) -> bytes | None:
        """The value's bytes, if its end was found."""
        return None if self.end is None else body[self.start:self.end]


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


@lru_cache(maxsize=64)
def _key_pattern(keys: tuple[str, ...]) -> re.Pattern[bytes]:
    """Any of ``keys`` (plain ASCII names) as a JSON string."""
    names = b"|".join(re.escape(k.encode("ascii")) for k in keys)
    return re.compile(b'"(' + names + b')"')


def _neutral(body: bytes, start: int) -> bytes:
    """``body`` with escaped quotes and backslashes blanked out (same length)."""
    if body.find(b"\\", start) < 0:
        return body  # no escapes: every quote is a delimiter already
    return body.replace(*_ESCAPED_BACKSLASH).replace(*_ESCAPED_QUOTE)


def find_members(body: bytes, keys: tuple[str, ...], start: int | None = None) -> dict[str, Member]:
    """Find members of a JSON object without decoding it.

    Args:
        body: The request body as received.
        keys: The member names looked for: printable ASCII without quotes
            or backslashes.
        start: Where the object's ``{`` is (default: the body's top level,
            after leading whitespace).

    Returns:
        Each key found as a member of that object (the last occurrence, as
        ``json.loads`` would take it), with where its value lies. A key
        inside a nested object or inside a string never counts. Empty when
        the body is not a JSON object there, or names the keys more than
        :data:`MAX_CANDIDATES` times.
    """
    if start is None:
        start = _LEADING_WHITESPACE.match(body).end()
    if body[start:start + 1] != b"{":
        return {}
    neutral = _neutral(body, start)
    pattern = _key_pattern(keys)
    found: dict[str, int] = {}
    # Walk the candidates left to right, keeping a position known to be
    # outside any string and the bracket depth there: each byte is looked at
    # a bounded number of times.
    pos, depth, looked = start, 0, 0
    match = pattern.search(neutral, start)
    while match is not None:
        looked += 1
        if looked > MAX_CANDIDATES:
            return {}
        candidate = match.start()
        if neutral.count(b'"', pos, candidate) == 0:
            # No string in between (a run of empty objects, say): count the
            # brackets in place, without copying the segment.
            depth += _brackets_in(neutral, pos, candidate)
            pos = match.end()
            if depth == 1:
                _note(neutral, pos, match, found)
            match = pattern.search(neutral, pos)
            continue
        skeleton = _skeleton(neutral[pos:candidate])
        if skeleton.count(b'"') % 2:
            # Inside a string (only in a body that is not JSON): resume after
            # that string's closing quote.
            close = neutral.find(b'"', candidate)
            if close < 0:
                break
            depth += _depth_change(_skeleton(neutral[pos:close + 1]))
            pos = close + 1
            match = pattern.search(neutral, pos)
            continue
        depth += _depth_change(skeleton)
        pos = match.end()
        if depth == 1:
            _note(neutral, pos, match, found)
        match = pattern.search(neutral, pos)
    return {k: Member(at, _value_end(neutral, at)) for k, at in found.items()}


def _brackets_in(data: bytes, start: int, end: int) -> int:
    """Brackets opened minus closed in ``data[start:end]`` (no copy made)."""
    return (data.count(b"{", start, end) + data.count(b"[", start, end)
            - data.count(b"}", start, end) - data.count(b"]", start, end))


def _note(neutral: bytes, after_key: int, match: re.Match[bytes], found: dict[str, int]) -> None:
    """Note where the value of the key just matched starts, if it is a key
    (followed by a colon) and not a string value that looks like one."""
    colon = after_key
    while neutral[colon:colon + 1] and neutral[colon] in _WHITESPACE:
        colon += 1
    if neutral[colon:colon + 1] == b":":
        value_at = colon + 1
        while neutral[value_at:value_at + 1] and neutral[value_at] in _WHITESPACE:
            value_at += 1
        found[match.group(1).decode("ascii")] = value_at


def _value_end(neutral: bytes, at: int) -> int | None:
    """Where the JSON value starting at ``neutral[at]`` ends, if found."""
    first = neutral[at:at + 1]
    if first == b'"':
        close = neutral.find(b'"', at + 1)
        return None if close < 0 else close + 1
    if first in (b"{", b"["):
        depth, pos, limit = 0, at, min(len(neutral), at + MAX_CONTAINER)
        while (part := _CONTAINER_PART.search(neutral, pos, limit)) is not None:
            pos = part.end()
            if part.group() == b'"':  # skip the string, quote to quote
                close = neutral.find(b'"', pos, limit)
                if close < 0:
                    return None
                pos = close + 1
                continue
            depth += 1 if part.group() in b"{[" else -1
            if depth == 0:
                return pos
        return None
    scalar = _SCALAR.match(neutral, at)
    return scalar.end() if scalar is not None else None


def _decoded_string(body: bytes, member: Member) -> str | None:
    """The member's value if it is a JSON string."""
    raw = member.raw(body)
    if raw is None or raw[:1] != b'"':
        return None
    try:
        value, _ = _scanstring(raw.decode("utf-8"), 1)
    except (UnicodeDecodeError, ValueError):
        return None
    return value


def string_value(body: bytes, member: Member) -> str | None:
    """A member's value if it is a JSON string (else None)."""
    return _decoded_string(body, member)


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
    member = find_members(body, ("model",)).get("model")
    return None if member is None else _decoded_string(body, member)


def replace_value(body: bytes, member: Member, value: object) -> bytes:
    """``body`` with one member's value replaced, every other byte kept.

    Args:
        body: The body.
        member: Where the value lies (its end must be known).
        value: The new value, written as compact ASCII JSON.

    Returns:
        The new body.
    """
    assert member.end is not None
    encoded = json.dumps(value, separators=(",", ":")).encode("ascii")
    view = memoryview(body)  # one copy of the body, not three
    return b"".join((view[:member.start], encoded, view[member.end:]))
