"""The benchmark's stream load generator (a child process of the bench).

``python -m llmproxy._streamload URL COUNT SPREAD CHUNKS DELAY OUT`` opens
COUNT raw HTTP/1.1 connections to URL's host, spread evenly over SPREAD
seconds, each asking the fake upstream (through the proxy or not) for an SSE
stream of CHUNKS events DELAY seconds apart, and writes per-stream
time-to-first-byte, duration and whether the stream ended properly to OUT
as JSON. ``... idle URL COUNT HOLD OUT`` opens COUNT connections that send
nothing, holds them HOLD seconds, and reports how many stayed open.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater, react

_BODY = json.dumps(
    {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
).encode()


class _Stream(Protocol):
    def __init__(self, clock: Any, request: bytes) -> None:
        self.clock = clock
        self.request = request
        self.started = 0.0
        self.first: float | None = None
        self.tail = b""
        self.complete = False
        self.done: Deferred[dict] = Deferred()

    def connectionMade(self) -> None:
        self.started = self.clock.seconds()
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.first is None:
            self.first = self.clock.seconds()
        self.tail = (self.tail + data)[-64:]
        if self.tail.endswith(b"0\r\n\r\n") and b"[DONE]" in self.tail + data:
            self.complete = True
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        now = self.clock.seconds()
        self.done.callback(
            {
                "ttfb_ms": None if self.first is None else 1000 * (self.first - self.started),
                "duration_ms": 1000 * (now - self.started),
                "complete": self.complete,
            }
        )


async def _streams(reactor: Any, url: str, count: int, spread: float, chunks: int,
                   delay: float) -> list[dict]:
    parts = urlsplit(url)
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(_BODY)}\r\n"
        f"X-Fake-Chunks: {chunks}\r\nX-Fake-Chunk-Delay: {delay}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + _BODY
    endpoint = TCP4ClientEndpoint(reactor, parts.hostname, parts.port, timeout=30)
    results: list[Deferred[dict]] = []

    def start() -> None:
        stream = _Stream(reactor, request)
        results.append(stream.done)
        connectProtocol(endpoint, stream).addErrback(
            lambda f: stream.done.callback({"ttfb_ms": None, "duration_ms": 0, "complete": False})
        )

    for i in range(count):
        reactor.callLater(spread * i / count, start)
    await deferLater(reactor, spread + 0.01)
    return list(await gatherResults(results))


async def _idle(reactor: Any, url: str, count: int, hold: float) -> dict:
    parts = urlsplit(url)
    endpoint = TCP4ClientEndpoint(reactor, parts.hostname, parts.port, timeout=30)
    protocols = [await connectProtocol(endpoint, Protocol()) for _ in range(count)]
    await deferLater(reactor, hold)
    open_ = sum(1 for p in protocols if p.transport.connected)
    for p in protocols:
        p.transport.loseConnection()
    return {"open": open_}


def main(argv: list[str]) -> None:
    """Run one load and write its results."""

    async def run(reactor: Any) -> None:
        if argv[0] == "idle":
            _, url, count, hold, out = argv
            result: Any = await _idle(reactor, url, int(count), float(hold))
        else:
            url, count, spread, chunks, delay, out = argv
            result = await _streams(reactor, url, int(count), float(spread), int(chunks),
                                    float(delay))
        with open(out, "w") as f:
            json.dump(result, f)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main(sys.argv[1:])
