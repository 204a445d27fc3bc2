"""Escaping text for readable console lines: :class:`Escaper`.

A console line is read by people and split into records by whatever
collects stdout (journald, a terminal, ``grep``), so text from a client or
an upstream must not start a line of its own, move the cursor, or fail to
encode. :class:`Escaper` writes such characters as visible escapes; text
without them comes back unchanged, after one cheap check.
"""

from __future__ import annotations

import codecs
import re

#: What a console line never holds as it is: C0 controls (TAB, LF and CR
#: included), DEL, C1 controls (NEL included), the line and paragraph
#: separators, bidi embeddings, overrides and isolates (they reorder how
#: the rest of a line displays), and surrogates (never valid text alone).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)

#: Escapes written by name; the others are ``\\xNN`` or ``\\uNNNN``.
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}

#: Encodings (as ``codecs.lookup`` names them) that hold every character
#: but a surrogate.
_UNICODE = frozenset(
    {"utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be",
     "utf-32", "utf-32-le", "utf-32-be"}
)


def _escape_char(match: re.Match[str]) -> str:
    """The visible escape of one unsafe character.

    Args:
        match: A match of one character of :data:`_UNSAFE`.

    Returns:
        ``\\t``, ``\\n``, ``\\r``, ``\\xNN`` or ``\\uNNNN`` (lower-case hex,
        as Python's ``backslashreplace`` writes).
    """
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class Escaper:
    """Makes text safe to write as (part of) one line on a text stream.

    Control characters, line separators, bidi overrides and surrogates are
    escaped (``\\r``, ``\\n``, ``\\t``, ``\\x1b``, ``\\x85``, ``\\u2028``,
    ``\\udc80``); so is anything else the stream's encoding cannot hold
    (``\\xe9`` on an ASCII stream). Backslashes are left alone: an escape
    is for reading, not for decoding back, and ordinary text (a Windows
    path) prints as it is.

    Attributes:
        narrow: Whether the encoding cannot hold every character, so that
            non-ASCII text must be checked against it.
    """

    def __init__(self, encoding: str | None) -> None:
        """Learn what the stream can hold.

        Args:
            encoding: The stream's encoding; None for a stream of ``str``
                that holds anything (``io.StringIO``). An encoding Python
                does not know is taken as ASCII.
        """
        self._encoding = "ascii"
        if encoding is None:
            self.narrow = False
            return
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            self.narrow = True
            return
        self.narrow = name not in _UNICODE
        self._encoding = name

    def safe(self, text: str) -> str:
        """``text``, escaped only if it needs to be.

        Args:
            text: Any text.

        Returns:
            ``text`` itself when every character is printable (and ASCII,
            on a narrow stream); otherwise :meth:`escape` of it.
        """
        if text.isprintable() and (not self.narrow or text.isascii()):
            return text
        return self.escape(text)

    def escape(self, text: str) -> str:
        """``text`` with every unsafe or unencodable character escaped.

        Args:
            text: Any text.

        Returns:
            Text without control characters, line separators, bidi
            overrides or surrogates, which the stream's encoding holds.
        """
        text = _UNSAFE.sub(_escape_char, text)
        if self.narrow and not text.isascii():
            try:
                text.encode(self._encoding)
            except UnicodeEncodeError:
                text = text.encode(self._encoding, "backslashreplace").decode(
                    self._encoding
                )
        return text
