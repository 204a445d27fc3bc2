"""Request bodies held in memory, with spliced-in replacements.

A body was read (and size-limited) before the request is sent. Written as
it is, it goes out in one piece. A body with a few bytes replaced (the
model an alias names, say) is never copied whole to splice them in: it is
written in chunks as the connection takes them, a push producer the
transport pauses and resumes, so the spliced body costs no second copy of
a large one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

#: Bytes written at a time when a body is streamed.
CHUNK = 64 * 1024

#: A replacement: bytes ``[start, end)`` of the body become ``data``.
Patch = tuple[int, int, bytes]


def _chunks(view: memoryview, start: int, end: int) -> Iterator[bytes]:
    for at in range(start, end, CHUNK):
        yield bytes(view[at:min(end, at + CHUNK)])


@implementer(IBodyProducer)
class BytesProducer:
    """A request body in memory, with replacements spliced in as it is written.

    It can be written again from the start, which lets a
    :class:`~llmproxy.egress._way.Way` resend it.

    Attributes:
        length: The bytes it writes.
    """

    def __init__(self, body: bytes, patches: Sequence[Patch] = ()) -> None:
        """Wrap ``body``.

        Args:
            body: The body as received.
            patches: Replacements, none overlapping another.
        """
        self._body = body
        self._patches = sorted(patches)
        self.length = len(body) + sum(len(data) - (end - start) for start, end, data in patches)
        self._pieces: Iterator[bytes] | None = None
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._paused = False
        self._writing = False

    def pieces(self) -> Iterator[bytes]:
        """The body's bytes, replacements in place, a chunk at a time."""
        view, at = memoryview(self._body), 0
        for start, end, data in self._patches:
            yield from _chunks(view, at, start)
            yield data
            at = end
        yield from _chunks(view, at, len(self._body))

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Write the body: in one piece, or with its replacements a chunk at
        a time as ``consumer`` takes them."""
        if not self._patches:
            consumer.write(self._body)
            return succeed(None)
        self._pieces, self._consumer, self._paused = self.pieces(), consumer, False
        self._done = done = Deferred()
        self._write()
        return done

    def _write(self) -> None:
        if self._writing:
            return
        self._writing = True
        try:
            while not self._paused and self._pieces is not None:
                piece = next(self._pieces, None)
                if piece is None:
                    self._pieces = None
                    done, self._done = self._done, None
                    assert done is not None
                    done.callback(None)
                    return
                if piece:
                    assert self._consumer is not None
                    self._consumer.write(piece)
        finally:
            self._writing = False

    def pauseProducing(self) -> None:
        """The connection's buffer is full: stop writing for now."""
        self._paused = True

    def resumeProducing(self) -> None:
        """The connection takes more: go on writing."""
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        """Write nothing more (the request was given up); the Deferred of
        :meth:`startProducing` never fires."""
        self._pieces = None
        self._done = None
