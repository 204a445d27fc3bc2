"""A request body as received, and what the proxy reads from and writes into it.

The body is never parsed as a document: its top-level members are found with
the router's bounded byte scan (:func:`~llmproxy.routing.find_members`), once,
and what the proxy changes (the model, for an alias or a fallback; a request
for the stream's usage) is spliced in as the body is written upstream, every
other byte kept as the client sent it, and the body never copied whole to do
it.
"""

from __future__ import annotations

import json
import re

from llmproxy.egress import BytesProducer, Patch
from llmproxy.routing import Member, find_members, string_value

#: What routing reads.
_MODEL = ("model",)
#: What budgets and a stream's usage read.
_ALL = ("model", "stream", "stream_options", "max_tokens", "max_completion_tokens",
        "max_output_tokens")
#: The members naming a request's output cap, the first found winning.
_OUTPUT_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")


class Body:
    """A request body, its top-level members (found once), and the values
    the proxy writes over some of them.

    Attributes:
        raw: The body as the client sent it.
    """

    def __init__(self, raw: bytes) -> None:
        """Hold ``raw`` (nothing is scanned yet)."""
        self.raw = raw
        self._members: dict[str, Member] | None = None
        self._keys: tuple[str, ...] = ()
        self._patches: dict[str, Patch] = {}

    def _found(self, keys: tuple[str, ...] = _MODEL) -> dict[str, Member]:
        if self._members is None or not set(keys) <= set(self._keys):
            self._keys = keys if self._members is None else _ALL
            self._members = find_members(self.raw, self._keys)
        return self._members

    def model(self) -> str | None:
        """The client's top-level string ``model``, if the body is a JSON
        object with one."""
        member = self._found().get("model")
        return None if member is None else string_value(self.raw, member)

    def set_model(self, model: str) -> None:
        """Send ``model`` upstream instead (a body without a top-level
        string ``model`` is sent as it is)."""
        member = self._found().get("model")
        if member is None or member.end is None or string_value(self.raw, member) is None:
            return
        self._patches["model"] = (member.start, member.end, json.dumps(model).encode("ascii"))

    def streams(self) -> bool:
        """Whether the body asks for a stream (``"stream": true``)."""
        member = self._found(_ALL).get("stream")
        return member is not None and member.raw(self.raw) == b"true"

    def output_cap(self) -> int | None:
        """The output tokens the request allows (``max_completion_tokens``,
        ``max_tokens`` or ``max_output_tokens``), if it names a cap."""
        members = self._found(_ALL)
        for key in _OUTPUT_CAPS:
            member = members.get(key)
            raw = member.raw(self.raw) if member is not None else None
            if raw is not None and raw.isdigit() and len(raw) <= 12:
                return int(raw)
        return None

    def ask_for_usage(self) -> bool:
        """Ask the upstream to end the stream with its usage
        (``stream_options.include_usage``), unless the client did.

        Returns:
            True when the body now asks for it and the client did not (the
            usage-only event is then the proxy's, not the client's); False
            when the client asked already, or the body is not a JSON object.
        """
        members = self._found(_ALL)
        first = _NOT_WHITESPACE.search(self.raw)
        if first is None or first.group() != b"{":
            return False
        start = first.start()
        options = members.get("stream_options")
        if options is None:
            self._patches["stream_options"] = _insert(
                self.raw, start, b'"stream_options":{"include_usage":true}'
            )
            return True
        if self.raw[options.start:options.start + 1] != b"{":
            if options.end is None:
                return False
            self._patches["stream_options"] = (
                options.start, options.end, b'{"include_usage":true}'
            )
            return True
        asked = find_members(self.raw, ("include_usage",), options.start).get("include_usage")
        if asked is not None and asked.raw(self.raw) == b"true":
            return False
        if asked is not None and asked.end is not None:
            self._patches["stream_options"] = (asked.start, asked.end, b"true")
        else:
            self._patches["stream_options"] = _insert(
                self.raw, options.start, b'"include_usage":true'
            )
        return True

    def producer(self) -> BytesProducer | None:
        """What writes the body upstream (None for an empty body)."""
        if not self.raw:
            return None
        return BytesProducer(self.raw, tuple(self._patches.values()))

    def __bytes__(self) -> bytes:
        """The body as it is sent upstream."""
        producer = self.producer()
        return b"" if producer is None else b"".join(producer.pieces())


def _insert(raw: bytes, brace: int, member: bytes) -> Patch:
    """A patch adding ``member`` first in the object opening at ``raw[brace]``."""
    after = _NOT_WHITESPACE.search(raw, brace + 1)
    separator = b"" if after is not None and after.group() == b"}" else b","
    return (brace + 1, brace + 1, member + separator)


def with_model(body: bytes, model: str) -> bytes:
    """``body`` naming ``model`` instead, in place (see :meth:`Body.set_model`)."""
    view = Body(body)
    view.set_model(model)
    return bytes(view)
