"""Token counts out of JSON: a usage object's fields, the last usage object in
the tail of a JSON body (found without decoding the body), and the
:class:`Usage` they make."""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

#: ``"usage"``, optional JSON whitespace, ``:``, optional whitespace, ``{``.
USAGE_KEY = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{')
_DECODER = json.JSONDecoder()
#: The bytes that matter when matching braces outside strings.
_STRUCTURAL = re.compile(rb'[{}"]')
#: The bytes that matter inside a JSON string.
_IN_STRING = re.compile(rb'["\\]')
#: How many ``"usage"`` objects in a JSON tail are tried, newest first.
_MAX_CANDIDATES = 8

#: The usage keys read from a usage object (OpenAI and Anthropic names).
_KEYS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _decode(data: bytes) -> Any:
    """Decode UTF-8 JSON, or return ``None`` if it is not that."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _count(value: object) -> int | None:
    """Return ``value`` as a token count, or ``None`` if it is not one.

    Args:
        value: A decoded JSON value.

    Returns:
        A non-negative int up to 2**53 (integral floats accepted; bools,
        other floats, strings and absurdly large numbers refused), or
        ``None``.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= _MAX_COUNT else None
    if isinstance(value, float) and value.is_integer() and 0 <= value <= _MAX_COUNT:
        return int(value)
    return None


#: The largest token count believed: every count below it is exact as a
#: float, so the metrics (floats) can always add and export it.
_MAX_COUNT = 2**53


def fields_of(usage: object) -> dict[str, int]:
    """Pick the valid token counts out of a decoded usage object.

    Args:
        usage: The value of a ``usage`` key; anything but a dict yields none.

    Returns:
        The known keys whose values are token counts.
    """
    if not isinstance(usage, dict):
        return {}
    fields = {}
    for key in _KEYS:
        count = _count(usage.get(key))
        if count is not None:
            fields[key] = count
    # Cached input: OpenAI chat's prompt_tokens_details, the Responses
    # API's input_tokens_details.
    for details in ("prompt_tokens_details", "input_tokens_details"):
        nested = usage.get(details)
        if isinstance(nested, dict):
            count = _count(nested.get("cached_tokens"))
            if count is not None:
                fields["cached_tokens"] = count
    return fields


def fields_from_tail(tail: bytes) -> dict[str, int]:
    """Find the last decodable ``"usage": {...}`` object in a JSON tail.

    Args:
        tail: The last bytes of a JSON body.

    Returns:
        The valid token counts of that object, or an empty dict.
    """
    last = tail.rfind(b'"usage"')
    if last < 0:
        return {}
    match = USAGE_KEY.match(tail, last)

    def candidates() -> list[int]:
        return [found.end() - 1 for found in USAGE_KEY.finditer(tail)]

    # The last "usage" is normally the key: then there is no need to find
    # every candidate unless it turns out broken.
    starts = [match.end() - 1] if match is not None else candidates()
    if starts:
        # Fast path: let the C decoder find where the last object ends.
        try:
            usage, _ = _DECODER.raw_decode(tail[starts[-1]:].decode("utf-8"))
        except (ValueError, RecursionError):
            usage = None
        if isinstance(usage, dict):
            return fields_of(usage)
    if match is not None:
        starts = candidates()
    for start in reversed(starts[-_MAX_CANDIDATES:]):
        end = _object_end(tail, start)
        if end is None:
            continue
        usage = _decode(tail[start:end])
        if isinstance(usage, dict):
            return fields_of(usage)
    return {}


def _object_end(data: bytes, start: int) -> int | None:
    """Find where the JSON object opening at ``data[start]`` ends.

    Braces inside strings (escapes included) are not counted.

    Args:
        data: The bytes.
        start: The index of the opening ``{``.

    Returns:
        The index just past the matching ``}``, or ``None`` if the data ends
        first.
    """
    depth = 0
    pos = start
    structural = _STRUCTURAL.search
    in_string = _IN_STRING.search
    while True:
        match = structural(data, pos)
        if match is None:
            return None
        pos = match.end()
        char = data[match.start()]
        if char == 0x7B:  # {
            depth += 1
        elif char == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return pos
        else:  # a string: skip to its closing quote
            while True:
                match = in_string(data, pos)
                if match is None:
                    return None
                if data[match.start()] == 0x22:  # "
                    pos = match.end()
                    break
                pos = match.end() + 1  # a backslash and the byte it escapes


@attrs.frozen
class Usage:
    """Token counts an upstream reported for one response.

    Attributes:
        prompt_tokens: Tokens in the input, cached input included; ``None``
            if not reported.
        completion_tokens: Tokens generated; ``None`` if not reported (as for
            embeddings).
        total_tokens: Tokens billed in all; the reported total, or the sum of
            the other two when both are known; ``None`` otherwise.
        cached_tokens: Tokens of the input read from a cache (part of
            ``prompt_tokens``), if reported.
        model: The model the upstream says answered, if it said.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    model: str | None = None


def to_usage(fields: dict[str, int], model: str | None = None) -> Usage:
    """Map OpenAI or Anthropic usage counts to a :class:`Usage`.

    OpenAI names win over Anthropic ones. Anthropic's cache tokens are not
    part of its ``input_tokens``, so they are added to the prompt (and its
    cache reads are the cached input).

    Args:
        fields: Valid token counts by their upstream names.
        model: The model the upstream named.

    Returns:
        The usage.
    """
    prompt = fields.get("prompt_tokens")
    if prompt is None and "input_tokens" in fields:
        prompt = (
            fields["input_tokens"]
            + fields.get("cache_creation_input_tokens", 0)
            + fields.get("cache_read_input_tokens", 0)
        )
    completion = fields.get("completion_tokens", fields.get("output_tokens"))
    total = fields.get("total_tokens")
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    cached = fields.get("cached_tokens", fields.get("cache_read_input_tokens"))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total,
                 cached_tokens=cached, model=model)
