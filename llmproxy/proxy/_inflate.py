"""Inflating a compressed response body on the side, a bounded piece at a time.

The client gets the bytes the upstream sent; the usage reader reads what
they inflate to, never more than :data:`MAX_INFLATED` bytes of it (a body
inflating past that, a bomb or not, is left unread) and never more than
:data:`STEP` bytes at a time.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

#: The most bytes a compressed body is inflated to; past it, it is not read.
MAX_INFLATED = 64 * 1024 * 1024
#: Inflated bytes made from one piece of input at a time.
STEP = 256 * 1024


class Inflater:
    """Inflates ``gzip`` or ``deflate`` (zlib-wrapped or raw) input.

    Attributes:
        failed: The input turned out not to inflate, or inflated past
            :data:`MAX_INFLATED`: nothing more is inflated.
    """

    @staticmethod
    def reads(encoding: bytes) -> bool:
        """Whether a ``Content-Encoding`` (lower case) is one it inflates."""
        return encoding in (b"gzip", b"x-gzip", b"deflate")

    def __init__(self, encoding: bytes) -> None:
        """Start inflating ``encoding`` (see :meth:`reads`)."""
        self._inflater: Any = zlib.decompressobj(31 if encoding != b"deflate" else 15)
        # "deflate" may come without zlib's header: the input is kept until
        # the first inflated byte, to start again raw if need be.
        self._start: bytearray | None = bytearray() if encoding == b"deflate" else None
        self._inflated = 0
        self.failed = False

    def inflate(self, chunk: bytes) -> Iterator[bytes]:
        """The next inflated pieces (at most :data:`STEP` bytes each)."""
        if self.failed:
            return
        start = self._start
        if start is not None:
            start += chunk
            if len(start) > STEP:
                self._start = None  # it inflates: keep no more
        data = chunk
        try:
            while data and not self.failed:
                piece = self._inflater.decompress(data, STEP)
                data = self._inflater.unconsumed_tail
                self._inflated += len(piece)
                if self._inflated > MAX_INFLATED:
                    self.failed = True  # a bomb, or far too big to read
                    return
                if piece:
                    self._start = None
                    yield piece
        except zlib.error:
            if start is not None and self._inflated == 0:
                # "deflate" sent raw, without zlib's header: start again.
                self._inflater, self._start = zlib.decompressobj(-15), None
                yield from self.inflate(bytes(start))
            else:
                self.failed = True
