"""The benchmark's stream load generator (a child process of the bench).

``python -m llmproxy.bench._streamload URL COUNT SPREAD CHUNKS DELAY OUT [PID]``
opens COUNT raw HTTP/1.1 connections to URL's host, spread evenly over
SPREAD seconds, each asking the fake upstream (through the proxy or not)
for an SSE stream of CHUNKS events DELAY seconds apart, and writes
per-stream time-to-first-byte, duration and whether the stream ended
properly to OUT as JSON (``{"streams": [...], "window": ...}``). With PID,
``window`` is the CPU that process used while every stream was open at
once (from when the first stream would end, CHUNKS * DELAY after the
first start, to the last start): the load at full concurrency, which the
ramp-up and ramp-down would dilute. ``... idle URL COUNT HOLD OUT`` opens
COUNT connections that send nothing, holds them HOLD seconds, and reports
how many stayed open.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater, react

from llmproxy.bench import cpu_seconds

_BODY = json.dumps(
    {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
).encode()


class FullConcurrency:
    """The window in which every stream of a load is open at once, and a
    process's CPU over it.

    The window runs from when the first stream would end (one stream's
    length after the first start) to the last start; it exists only when
    the starts are spread over longer than a stream lasts. :meth:`tick` is
    called with the time at each turn of the load's loop: it notes the CPU
    on the first tick at or after each edge.

    Args:
        begin: When the first stream starts.
        count: How many streams start, evenly over ``spread`` seconds.
        spread: Seconds over which the streams start.
        stream_seconds: How long each stream lasts.
        cpu: The watched process's CPU seconds so far.
    """

    def __init__(self, begin: float, count: int, spread: float, stream_seconds: float,
                 cpu: Any) -> None:
        self.opens = begin + stream_seconds
        self.closes = begin + spread * (count - 1) / max(count, 1)
        self._cpu = cpu
        self._marks: list[tuple[float, float]] = []

    @property
    def exists(self) -> bool:
        """Whether the streams ever all overlap."""
        return self.opens < self.closes

    def tick(self, now: float) -> None:
        """The load's loop turned at ``now``."""
        marks = self._marks
        if self.exists and len(marks) < 2 and now >= (self.closes if marks else self.opens):
            marks.append((now, self._cpu()))

    def result(self) -> dict | None:
        """``{"seconds", "cpu_seconds"}`` over the window, once both edges
        were seen; else None."""
        if len(self._marks) < 2:
            return None
        (start, cpu_start), (end, cpu_end) = self._marks
        return {"seconds": end - start, "cpu_seconds": cpu_end - cpu_start}


def _streams(url: str, count: int, spread: float, chunks: int, delay: float,
             watch: int | None = None) -> tuple[list[dict], dict | None]:
    """Run the stream load on plain non-blocking sockets and one epoll.

    No reactor: on the generator's core, which it shares with the upstream,
    the Twisted version took over half the core at 1,000 streams a second,
    and a busy generator delays every first byte it measures. Each stream's
    clock starts when its TCP connection is up (the request is sent then)
    and stops at the first byte of the answer.

    Returns the per-stream results and, with ``watch`` (a process id) and
    a load whose streams all overlap for a while (SPREAD longer than a
    stream), that process's CPU seconds over the full-concurrency window
    and the window's length; otherwise None.
    """
    parts = urlsplit(url)
    address = (parts.hostname, parts.port)
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(_BODY)}\r\n"
        f"X-Fake-Chunks: {chunks}\r\nX-Fake-Chunk-Delay: {delay}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + _BODY
    poller = select.epoll()
    # fd -> [socket, started, first, tail, complete, results index]
    streams: dict[int, list[Any]] = {}
    results: list[dict] = []
    clock = time.monotonic
    begin = clock()
    deadline = begin + spread + 30 + chunks * delay  # a stuck stream ends here
    started = 0
    window = None
    if watch is not None:
        window = FullConcurrency(begin, count, spread, chunks * delay,
                                 lambda: cpu_seconds(watch))

    def end(fd: int, now: float) -> None:
        stream = streams.pop(fd)
        poller.unregister(fd)
        stream[0].close()
        results[stream[5]] = {
            "ttfb_ms": None if stream[2] is None else 1000 * (stream[2] - stream[1]),
            "duration_ms": 1000 * (now - stream[1]) if stream[1] else 0,
            "complete": stream[4],
        }

    while started < count or streams:
        now = clock()
        if window is not None:
            window.tick(now)
        while started < count and begin + spread * started / count <= now:
            results.append({"ttfb_ms": None, "duration_ms": 0, "complete": False})
            try:  # out of file descriptors, say: this stream counts as aborted
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                started += 1
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if sock.connect_ex(address) not in (0, errno.EINPROGRESS):
                sock.close()
            else:
                streams[sock.fileno()] = [sock, 0.0, None, b"", False, started]
                poller.register(sock.fileno(), select.EPOLLOUT)
            started += 1
        if now > deadline:
            for fd in list(streams):
                end(fd, now)
            break
        wait = begin + spread * started / count - now if started < count else 1.0
        for fd, event in poller.poll(max(wait, 0)):
            stream = streams[fd]
            sock = stream[0]
            now = clock()
            if not stream[1]:  # connecting
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    end(fd, now)
                    continue
                stream[1] = now
                try:  # a few hundred bytes into an empty buffer: all or nothing
                    whole = sock.send(request) == len(request)
                except OSError:
                    whole = False
                if not whole:
                    end(fd, now)
                    continue
                poller.modify(fd, select.EPOLLIN)
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:  # a spurious wake-up
                continue
            except OSError:
                data = b""
            if data:
                if stream[2] is None:
                    stream[2] = now
                tail = (stream[3] + data)[-64:]
                stream[3] = tail
                if tail.endswith(b"0\r\n\r\n") and tail.find(b"[DONE]") >= 0:
                    stream[4] = True
                    end(fd, now)
            else:
                end(fd, now)
    poller.close()
    return results, window.result() if window is not None else None


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
    if argv[0] == "idle":
        _, url, count, hold, out = argv

        async def idle(reactor: Any) -> None:
            result = await _idle(reactor, url, int(count), float(hold))
            with open(out, "w") as f:
                json.dump(result, f)

        react(lambda reactor: Deferred.fromCoroutine(idle(reactor)))
        return
    url, count, spread, chunks, delay, out, *watch = argv
    streams, window = _streams(url, int(count), float(spread), int(chunks), float(delay),
                               int(watch[0]) if watch else None)
    with open(out, "w") as f:
        json.dump({"streams": streams, "window": window}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
