"""Token usage read from a response body while it streams through.

The proxy never holds a response back: every chunk goes to the client as it
arrives. A :class:`UsageReader` looks at the same chunks on the side, with
bounded memory and little work per chunk, and at the end of the body reports
the token counts the upstream put in it (:class:`Usage`), for the access log
and the metrics.

Two body shapes are understood:

* ``text/event-stream``: the body is split into lines across chunk
  boundaries (``\\n``, ``\\r\\n`` or ``\\r``); only the unfinished last line
  is kept between chunks, and at most ``max_line`` bytes of it. A ``data:``
  line is JSON-decoded only when it holds ``"usage": {``. OpenAI chat streams
  (the ``stream_options.include_usage`` chunk), OpenAI Responses streams
  (``response.completed``) and Anthropic message streams (``message_start``
  and ``message_delta``) are read; later values replace earlier ones.
* JSON (``application/json``, any ``+json`` type, or no content type): only
  the last ``tail_bytes`` of the body are kept. At the end, the last
  ``"usage": {...}`` object in that tail is cut out by brace matching and
  decoded.

A body compressed with ``gzip`` or ``deflate`` is inflated on the side, a
bounded piece at a time (the client still gets the bytes the upstream sent),
up to :data:`MAX_INFLATED` bytes; other encodings and media types are not
read. The model the upstream names in the usage-bearing event (or the JSON
body) is kept too. With ``count_text`` an event stream's generated text is
counted (the characters of its content, text, reasoning and thinking
deltas), for an estimate when a stream ends without usage. Nothing here
raises on bad input: an unreadable body simply yields an empty
:class:`Usage`. This module is pure logic, with no I/O and no reactor.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmproxy.proxy._inflate import MAX_INFLATED, Inflater
from llmproxy.proxy._usage_fields import USAGE_KEY, Usage, fields_from_tail, fields_of, to_usage
from llmproxy.routing import extract_model

__all__ = ["MAX_INFLATED", "Usage", "UsageReader"]

#: The bytes at a JSON body's start kept for its ``model``.
_HEAD_BYTES = 2048
#: A generated text in an event: OpenAI chat deltas, the Responses API's
#: text deltas, Anthropic's text and thinking deltas.
_TEXT = re.compile(
    rb'"(?:content|text|reasoning_content|reasoning|thinking|delta|partial_json)"'
    rb'[ \t]*:[ \t]*"((?:[^"\\]|\\.)*)"'
)
#: The Responses API's generated text: only its ``*.delta`` events' ``delta``
#: (its ``*.done`` and ``response.completed`` events repeat the whole text).
_RESPONSES_TEXT = re.compile(rb'"delta"[ \t]*:[ \t]*"((?:[^"\\]|\\.)*)"')
#: What marks a Responses API event.
_RESPONSES_EVENT = b'"response.'

_EVENT_STREAM = b"text/event-stream"
_JSON = b"application/json"
_BOM = b"\xef\xbb\xbf"
_CR = 0x0D

class UsageReader:
    """Reads token usage from a response body, chunk by chunk.

    Call :meth:`feed` with every body chunk as it is passed on to the client
    and :meth:`finish` once at the end of the body. Memory is bounded by
    ``max_line`` (event streams) or ``tail_bytes`` (JSON bodies), whatever
    the size of the body.

    Args:
        content_type: The response's ``Content-Type`` value, or ``None``.
        content_encoding: The response's ``Content-Encoding`` value, or
            ``None``: ``gzip`` and ``deflate`` are inflated on the side,
            anything else but ``identity`` turns the reader off.
        count_text: Count an event stream's generated text
            (:attr:`text_chars`).
        max_line: The longest event-stream line kept, in bytes without its
            line ending; longer lines are dropped.
        tail_bytes: How many bytes at the end of a JSON body are kept.

    Raises:
        ValueError: If ``max_line`` or ``tail_bytes`` is not positive.
    """

    def __init__(
        self,
        content_type: bytes | None,
        content_encoding: bytes | None = None,
        *,
        count_text: bool = False,
        max_line: int = 1 << 20,
        tail_bytes: int = 64 * 1024,
    ) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        if tail_bytes < 1:
            raise ValueError("tail_bytes must be positive")
        self._max_line = max_line
        self._tail_bytes = tail_bytes
        self._mode = _mode_for(content_type)
        self._inflater: Inflater | None = None
        encoding = (content_encoding or b"").strip().lower()
        if Inflater.reads(encoding):
            self._inflater = Inflater(encoding)
        elif encoding and encoding != b"identity":
            self._mode = None
        self._count_text = count_text and self._mode == "sse"
        #: Characters of generated text seen (with ``count_text``).
        self.text_chars = 0
        self._model: str | None = None
        self._head = bytearray()
        # Event streams: the unfinished last line and the line-splitting state.
        self._partial = bytearray()
        self._overflow = False  # the current line outgrew max_line: skip it
        self._skip_lf = False  # the last chunk ended in \r: a leading \n is its pair
        self._first_line = True  # a BOM may start the stream
        self._fields: dict[str, int] = {}
        # JSON bodies: the last tail_bytes of the body.
        self._tail = bytearray()
        self._result: Usage | None = None

    @property
    def buffered(self) -> int:
        """How many body bytes the reader holds right now."""
        return len(self._partial) + len(self._tail)

    def feed(self, chunk: bytes) -> None:
        """Look at the next chunk of the body.

        Args:
            chunk: The bytes, exactly as they are passed on to the client.
        """
        if self._result is not None or not chunk or self._mode is None:
            return
        if self._inflater is not None:
            self._feed_compressed(chunk)
        else:
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        if self._mode == "sse":
            if self._count_text and chunk.find(b'"') >= 0:
                texts = _RESPONSES_TEXT if chunk.find(_RESPONSES_EVENT) >= 0 else _TEXT
                for text in texts.finditer(chunk):
                    self.text_chars += len(text.group(1))
            if (
                chunk[-1:] == b"\n"
                # find, not `in`: on CPython 3.11 `bytes in bytes` raises
                # and clears a TypeError each time.
                and chunk.find(b"usage") < 0
                and not (self._partial or self._skip_lf or self._overflow)
            ):
                # Whole lines, none of them about usage: nothing to keep.
                self._first_line = False
                return
            self._feed_sse(chunk)
        elif self._mode == "json":
            if len(self._head) < _HEAD_BYTES:
                self._head += chunk[:_HEAD_BYTES - len(self._head)]
            self._feed_json(chunk)

    def _feed_compressed(self, chunk: bytes) -> None:
        """Inflate a compressed chunk, a bounded piece at a time, and read it."""
        assert self._inflater is not None
        for piece in self._inflater.inflate(chunk):
            if self._mode is None:
                return
            self._feed(piece)
        if self._inflater.failed:
            self._mode = None

    def finish(self) -> Usage:
        """End the body and return the usage found in it.

        Further calls return the same result; chunks fed after it are ignored.

        Returns:
            The usage; all fields ``None`` if the body reported none (or was
            not readable).
        """
        if self._result is None:
            if self._mode == "sse":
                # Be lenient about a missing final line end.
                if self._partial and not self._overflow:
                    self._line(bytes(self._partial))
                usage = to_usage(self._fields, self._model)
            elif self._mode == "json":
                head = bytes(self._head)
                model = extract_model(head) if head.find(b'"model"') >= 0 else None
                usage = to_usage(fields_from_tail(bytes(self._tail)), model)
            else:
                usage = Usage()
            self._result = usage
            self._partial = bytearray()
            self._tail = bytearray()
        return self._result

    # -- JSON bodies ---------------------------------------------------------

    def _feed_json(self, chunk: bytes) -> None:
        """Keep the last ``tail_bytes`` of the body.

        Args:
            chunk: The next body bytes.
        """
        tail = self._tail
        if len(chunk) >= self._tail_bytes:
            tail[:] = chunk[-self._tail_bytes :]
            return
        tail += chunk
        excess = len(tail) - self._tail_bytes
        if excess > 0:
            # bytearray drops a prefix without moving the rest.
            del tail[:excess]

    # -- event streams -------------------------------------------------------

    def _feed_sse(self, chunk: bytes) -> None:
        """Split the next chunk into lines, joining the carried partial line.

        Only the new bytes are searched for line ends; the complete lines
        after the first are split apart only if the chunk holds a
        ``"usage": {`` at all.

        Args:
            chunk: The next body bytes.
        """
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return
        last = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if last < 0:
            self._extend_partial(chunk)
            return
        # The first line end in this chunk closes the carried partial line.
        lf, cr = chunk.find(b"\n"), chunk.find(b"\r")
        first = lf if cr < 0 else cr if lf < 0 else min(lf, cr)
        self._end_line(chunk[:first])
        start = first + 1
        if chunk[first] == _CR and chunk[start : start + 1] == b"\n":
            start += 1
        # Lines wholly inside this chunk.
        if start <= last and USAGE_KEY.search(chunk, start, last + 1):
            max_line = self._max_line
            for line in chunk[start : last + 1].splitlines():
                if len(line) <= max_line:
                    self._line(line)
        # A chunk ending in \r may have its \n at the start of the next one.
        if last == len(chunk) - 1:
            self._skip_lf = chunk[last] == _CR
        else:
            self._extend_partial(chunk[last + 1 :])

    def _extend_partial(self, data: bytes) -> None:
        """Add bytes without a line end to the partial line, within bounds.

        Args:
            data: Bytes that continue the current line.
        """
        if self._overflow:
            return
        if len(self._partial) + len(data) > self._max_line:
            self._overflow = True
            self._partial.clear()
        else:
            self._partial += data

    def _end_line(self, data: bytes) -> None:
        """Complete the partial line with ``data`` and look at it.

        Args:
            data: The line's last bytes, without the line ending.
        """
        if self._overflow:
            self._overflow = False
            self._first_line = False
            return
        if self._partial:
            if len(self._partial) + len(data) > self._max_line:
                self._partial.clear()
                self._first_line = False
                return
            self._partial += data
            line = bytes(self._partial)
            self._partial.clear()
        elif len(data) > self._max_line:
            self._first_line = False  # a BOM only counts at the very start
            return
        else:
            line = data
        self._line(line)

    def _line(self, line: bytes) -> None:
        """Look at one complete event-stream line.

        Args:
            line: The line, without its line ending.
        """
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        # Cheap checks first: most chunks say "usage": null or nothing.
        if (
            line.find(b"usage") < 0
            or not line.startswith(b"data:")
            or not USAGE_KEY.search(line)
        ):
            return
        event = _loads(line[5:].removeprefix(b" "))
        if not isinstance(event, dict):
            return
        # Anthropic message_start, then OpenAI Responses response.completed,
        # then the top-level usage of OpenAI chat and Anthropic message_delta.
        for holder in (event.get("message"), event.get("response"), event):
            if isinstance(holder, dict):
                self._fields.update(fields_of(holder.get("usage")))
                model = holder.get("model")
                if isinstance(model, str) and model:
                    self._model = model


def _mode_for(content_type: bytes | None) -> str | None:
    """Choose how a body of this type is read.

    Args:
        content_type: The ``Content-Type`` value, or ``None``.

    Returns:
        ``"sse"``, ``"json"``, or ``None`` for a body that is not read.
    """
    if content_type is None:
        return "json"
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type == _EVENT_STREAM:
        return "sse"
    if not media_type or media_type == _JSON or media_type.endswith(b"+json"):
        return "json"
    return None


def _loads(data: bytes) -> Any:
    """Decode UTF-8 JSON, or return ``None`` if it is not that.

    Args:
        data: The bytes to decode.

    Returns:
        The decoded value, or ``None``.
    """
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
