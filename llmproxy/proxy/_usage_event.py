"""Taking the proxy's own usage event out of an OpenAI stream.

When the proxy asked an upstream for a stream's usage
(``stream_options.include_usage``) and the client did not, the stream ends
with an event the client never asked for: a chunk with empty ``choices`` and
a ``usage`` object. :class:`UsageEventFilter` passes every other event on as
it arrives and drops that one, so the client sees exactly the stream it
asked for. It holds back at most the stream's last, unfinished event (up to
:data:`MAX_PENDING` bytes; past that the bytes go on unfiltered).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Protocol

#: The most bytes of an unfinished event held back.
MAX_PENDING = 1024 * 1024
#: The blank line that ends an event, in any of the allowed line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


#: Paths whose streams report usage only when asked (OpenAI chat and legacy
#: completions); the Responses API and Anthropic's messages always do.
_ASKING_PATHS = (b"/chat/completions", b"/completions")


class _Streaming(Protocol):
    def streams(self) -> bool: ...

    def ask_for_usage(self) -> bool: ...


def ask_stream_usage(body: _Streaming, path: bytes, mode: str, budgeted: bool) -> bool:
    """Ask an OpenAI stream for its usage on the client's behalf, if it
    should be (``stream_usage``).

    Args:
        body: The request body (it gets ``stream_options.include_usage``).
        path: The routed path.
        mode: ``budget`` (for a key with a budget only), ``always`` or
            ``never``.
        budgeted: Whether the request counts against a budget.

    Returns:
        True when the body now asks for the usage and the client did not:
        the usage-only event is then to be taken out of the client's stream.
    """
    if mode == "never" or (mode == "budget" and not budgeted):
        return False
    if not path.endswith(_ASKING_PATHS) or not body.streams():
        return False
    return body.ask_for_usage()


def is_usage_event(event: bytes) -> bool:
    """Whether ``event`` (one event's lines) is OpenAI's usage-only chunk."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        try:
            data = json.loads(line[5:].strip().decode("utf-8"))
        except (ValueError, RecursionError):
            return False
        return (isinstance(data, dict) and data.get("choices") == []
                and isinstance(data.get("usage"), dict))
    return False


class UsageEventFilter:
    """Passes an event stream on, without its usage-only event.

    Args:
        write: Where the client's bytes go.
    """

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self._pending = b""

    def feed(self, data: bytes) -> None:
        """Pass on the whole events in ``data`` (and what was held back)."""
        data = self._pending + data if self._pending else data
        ends = [m.end() for m in _EVENT_END.finditer(data)]
        if not ends:
            self._hold(data)
            return
        whole, self._pending = data[:ends[-1]], data[ends[-1]:]
        if whole.find(b'"usage"') >= 0:
            whole = self._without_usage(whole, ends)
        if whole:
            self._write(whole)
        if len(self._pending) > MAX_PENDING:
            self._write(self._pending)
            self._pending = b""

    def finish(self) -> None:
        """The stream ended: pass on what was held back (unless it is the
        usage event, ended without its blank line)."""
        pending, self._pending = self._pending, b""
        if pending and not is_usage_event(pending):
            self._write(pending)

    def _hold(self, data: bytes) -> None:
        if len(data) > MAX_PENDING:
            self._write(data)
            data = b""
        self._pending = data

    @staticmethod
    def _without_usage(whole: bytes, ends: list[int]) -> bytes:
        kept, start = [], 0
        for end in ends:
            event = whole[start:end]
            if event.find(b'"usage"') < 0 or not is_usage_event(event):
                kept.append(event)
            start = end
        return b"".join(kept)
