"""Sending written bytes without the reactor's write registration.

A Twisted TCP transport buffers every ``write``, registers with the reactor
for writing, sends on the next poll and unregisters: two ``epoll_ctl`` calls
and one more dispatched event for every write. :func:`write_now` bypasses
that for plain TCP transports with nothing queued:

- While at most one fast-path request is in flight (:data:`active`), the
  bytes are sent at once, so a lone request's answer leaves before the work
  done after the write (the access record, say).
- Under load, writes are held until the end of the current reactor
  iteration and then sent together: by the daemon's own loop step
  (:mod:`llmproxy._loop`), or else by one ``callLater(0)`` per iteration.
  Sending each write at once under load measured slower than Twisted's own
  buffering (more system time per request, on this VM), while sending them
  together at the end of the iteration measured about 18 % more requests
  per second than Twisted's buffering.

What the socket does not take goes to ``transport.write`` as usual, and so
does everything for other transports (TLS, tests' fakes). A transport's
held writes go out in order and in one send (a stream whose events arrive
together leaves in one piece); code that writes to a transport without this
module first calls :func:`flush`.

:func:`lose` closes a connection whose bytes have all been sent at the end
of the daemon loop's step, not one poll later as ``loseConnection`` does
(see there).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.main import CONNECTION_DONE
from twisted.internet.tcp import Connection
from twisted.logger import Logger

try:  # the client endpoints' forwarding wrapper (private: see unwrap)
    from twisted.internet.endpoints import _WrappingProtocol as _Wrapper
except ImportError:  # pragma: no cover - a Twisted that renamed it
    _Wrapper = None

__all__ = ["flush", "lose", "no_delay", "settle", "unwrap", "write_now"]

log = Logger()

#: Requests in flight on the fast path (llmproxy._server keeps count).
active = 0

#: The reactor whose loop calls :func:`flush` itself, before each poll and
#: after each poll's events (set by :func:`llmproxy._loop.lighten`): its
#: transports' writes need no ``callLater(0)`` (a DelayedCall in the
#: reactor's heap).
flushing_loop: Any = None


def no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP transport (a no-op for others).

    A stream's small chunks then leave at once instead of waiting for the
    peer's acknowledgement of the previous ones.

    Args:
        transport: A connection's transport.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


def unwrap(transport: Any, protocol: Any) -> None:
    """Deliver a plain TCP connection's events to ``protocol`` itself.

    A connection made through a client endpoint passes every event through
    the endpoint's wrapper, which only forwards them: one more call per
    received chunk. Once ``protocol`` is connected (call this from its
    ``connectionMade``), a plain TCP transport is pointed at it directly;
    any other transport (TLS, a tunnel, a test's) is left as it is.

    Args:
        transport: The connection's transport.
        protocol: The protocol the endpoint wrapped.
    """
    if _Wrapper is not None and isinstance(transport, Connection):
        wrapper = getattr(transport, "protocol", None)
        if type(wrapper) is _Wrapper and getattr(wrapper, "_wrappedProtocol", None) is protocol:
            transport.protocol = protocol


def _send(transport: Any, data: bytes) -> None:
    """Send ``data`` now if possible; queue the rest on the transport."""
    try:
        now = (
            isinstance(transport, Connection)
            and transport.connected
            and not transport.disconnecting
            # abortConnection leaves the socket open until the next turn, but
            # what is written after it must be dropped, as Twisted does.
            and not transport._aborting
            and not transport.TLS
            and not transport.dataBuffer
            # Queued writes wait here until the next doWrite; Twisted keeps
            # no public flag for them.
            and not transport._tempDataBuffer
        )
    except AttributeError:  # a Twisted without these private attributes: queue
        now = False
    if now:
        # What tcp.Connection.writeSomeData does, without its two calls.
        try:
            sent = transport.socket.send(data)
        except OSError:  # full (EAGAIN), or an error the next doWrite reports
            sent = 0
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


#: Writes held until the end of this reactor iteration: each transport's
#: pieces in order (one send per transport when flushed).
_held: dict[Any, list[bytes]] = {}


def flush() -> None:
    """Send every held write now, each transport's pieces as one."""
    while _held:
        held = list(_held.items())
        _held.clear()
        for transport, pieces in held:
            try:
                _send(transport, b"".join(pieces))
            except Exception:
                log.failure("writing to {transport!r}", transport=transport)


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``: at once, at the iteration's end, or queued.

    Args:
        transport: The connection's transport.
        data: The bytes to send.
    """
    if not data:
        return
    pieces = _held.get(transport)
    if pieces is not None:
        pieces.append(data)
    elif active > 1 and isinstance(transport, Connection):
        # Held; whether the socket can take it is decided when sent.
        if not _held and transport.reactor is not flushing_loop:
            transport.reactor.callLater(0, flush)
        _held[transport] = [data]
    else:
        _send(transport, data)


#: Connections :func:`lose` closes at the end of this step of the loop.
_closing: deque[Any] = deque()


def _written(transport: Any) -> bool:
    """Whether a TCP transport has nothing queued and no producer."""
    return (not transport.dataBuffer and not transport._tempDataBuffer
            and transport.producer is None)


def lose(transport: Any) -> None:
    """Close ``transport`` once what was written to it is sent.

    ``loseConnection`` on a Twisted TCP transport registers it for writing
    even when nothing is queued, so that the next poll reports it writable
    and its ``doWrite`` finds nothing to send and closes it: three
    ``epoll_ctl`` calls, an event and an empty ``send`` per close. On the
    daemon's loop (:mod:`llmproxy._loop`) a plain TCP transport with
    nothing queued stops reading now and is closed at the end of this step
    instead, the way that ``doWrite`` would close it (what is written to it
    meanwhile is still sent first), and at the latest when the reactor
    shuts down. Anything else is ``loseConnection``.

    Args:
        transport: The connection's transport.
    """
    try:
        now = (
            transport.reactor is flushing_loop
            and isinstance(transport, Connection)
            and transport.connected
            and not transport.disconnecting
            and not transport._aborting
            and not transport.TLS
            and not transport._writeDisconnected
            and _written(transport)
        )
    except AttributeError:  # a Twisted without these private attributes
        now = False
    if not now:
        transport.loseConnection()
        return
    transport.stopReading()
    transport.disconnecting = 1  # as loseConnection: later calls do nothing
    _closing.append(transport)


def _close() -> None:
    """Close what :func:`lose` left for the end of the step (one at a
    time: what a raise leaves is still closed by the next call)."""
    while _closing:
        transport = _closing.popleft()
        try:
            if not transport.connected or transport._aborting:
                continue  # closed or aborted meanwhile
            if not _written(transport):
                # Written to since: its doWrite sends that, then closes.
                transport.startWriting()
                continue
            transport.reactor._disconnectSelectable(transport, CONNECTION_DONE, False)
        except Exception:
            log.failure("closing {transport!r}", transport=transport)


def settle() -> None:
    """Send every held write, then close what :func:`lose` left to close."""
    flush()
    while _closing:
        _close()
        flush()  # what the closes wrote
