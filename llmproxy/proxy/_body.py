"""A request body as received, and what the proxy reads from and writes into it.

The body is never parsed as a document: its top-level members are found with
the router's bounded byte scan (:func:`~llmproxy.routing.find_members`), once,
and a member the proxy changes (the model, for an alias or a fallback) is
replaced in place as the body is written upstream, every other byte kept as
the client sent it, and the body never copied whole to do it.
"""

from __future__ import annotations

import json

from llmproxy.egress import BytesProducer, Patch
from llmproxy.routing import Member, find_members, string_value

#: The top-level members the proxy reads.
KEYS = ("model",)


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
        self._patches: dict[str, Patch] = {}

    def _found(self) -> dict[str, Member]:
        if self._members is None:
            self._members = find_members(self.raw, KEYS)
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
        self._patches["model"] = (member.start, member.end, json_string(model))

    def producer(self) -> BytesProducer | None:
        """What writes the body upstream (None for an empty body)."""
        if not self.raw:
            return None
        return BytesProducer(self.raw, tuple(self._patches.values()))

    def __bytes__(self) -> bytes:
        """The body as it is sent upstream."""
        producer = self.producer()
        return b"" if producer is None else b"".join(producer.pieces())


def json_string(value: str) -> bytes:
    """``value`` as a JSON string, in ASCII."""
    return json.dumps(value).encode("ascii")


def with_model(body: bytes, model: str) -> bytes:
    """``body`` naming ``model`` instead, in place (see :meth:`Body.set_model`)."""
    view = Body(body)
    view.set_model(model)
    return bytes(view)
