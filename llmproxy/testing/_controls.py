"""The ``X-Fake-*`` control headers of the fake upstream, parsed and checked.

Private to the package: :mod:`~llmproxy.testing._exchange` reads them.
"""

from __future__ import annotations

import math
import re

import attrs
from twisted.web.http_headers import Headers

_MAX_CHUNKS = 100_000
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class BadRequest(Exception):
    """A control header or the JSON body is invalid: answered with a 400."""


@attrs.frozen
class Controls:
    """The parsed ``X-Fake-*`` request headers (see
    :class:`~llmproxy.testing.upstream.FakeUpstream`); the defaults are the
    fake's normal behaviour.

    Attributes:
        status: ``X-Fake-Status``.
        chunks: ``X-Fake-Chunks``: content pieces in a stream.
        chunk_delay: ``X-Fake-Chunk-Delay``, in seconds.
        header_delay: ``X-Fake-Header-Delay``, in seconds.
        abort_after: ``X-Fake-Abort-After``, or None to never abort.
        body_bytes: ``X-Fake-Body-Bytes``, or None for the route's reply.
        content_length: ``X-Fake-Content-Length: 1``.
        extra_headers: ``X-Fake-Response-Header`` values as (name, value).
    """

    status: int = 200
    chunks: int = 5
    chunk_delay: float = 0.0
    header_delay: float = 0.0
    abort_after: int | None = None
    body_bytes: int | None = None
    content_length: bool = False
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def parse(cls, headers: Headers) -> Controls:
        """Parse the control headers.

        Args:
            headers: The request headers.

        Returns:
            The controls.

        Raises:
            BadRequest: A control header is invalid.
        """

        def last(name: bytes) -> str | None:
            values = headers.getRawHeaders(name)
            return values[-1].decode("latin-1").strip() if values else None

        def integer(name: bytes, low: int, high: int) -> int | None:
            raw = last(name)
            if raw is None:
                return None
            if not (re.fullmatch("[0-9]{1,19}", raw) and low <= int(raw) <= high):
                raise BadRequest(f"{name.decode()}: an integer in [{low}, {high}]")
            return int(raw)

        def seconds(name: bytes) -> float:
            try:
                value = float(last(name) or "0")
            except ValueError:
                value = math.nan
            if not 0 <= value <= 86400:
                raise BadRequest(f"{name.decode()}: a number of seconds")
            return value

        extra = []
        for raw in headers.getRawHeaders(b"x-fake-response-header", []):
            name, colon, value = raw.partition(b":")
            if not colon or not _TOKEN.fullmatch(name.strip()):
                raise BadRequest("x-fake-response-header: 'Name: value'")
            extra.append((name.strip(), value.strip()))
        if (flag := last(b"x-fake-content-length")) not in (None, "0", "1"):
            raise BadRequest("x-fake-content-length: 0 or 1")
        return cls(
            status=integer(b"x-fake-status", 200, 599) or 200,
            chunks=integer(b"x-fake-chunks", 1, _MAX_CHUNKS) or 5,
            chunk_delay=seconds(b"x-fake-chunk-delay"),
            header_delay=seconds(b"x-fake-header-delay"),
            abort_after=integer(b"x-fake-abort-after", 0, _MAX_CHUNKS),
            body_bytes=integer(b"x-fake-body-bytes", 0, 2**62),
            content_length=flag == "1",
            extra_headers=tuple(extra),
        )
