"""Sending written bytes now instead of on the reactor's next turn.

A Twisted TCP transport buffers every ``write`` and sends it when the
reactor next polls. For a lone request that costs a whole reactor turn per
hop and puts work done after the write (the access record, say) before the
bytes leave. :func:`send_now` asks a plain TCP transport to send what it
buffered at once, which is what the reactor would do next, through the
transport's public ``doWrite`` (IWriteDescriptor).

Only while at most one fast-path request is in flight (:data:`active`):
under load, leaving the sends to the reactor's poll measured about 10 %
more requests per second, while for a single client sending at once cut
the median added latency by about 0.15 ms.
"""

from __future__ import annotations

from typing import Any

__all__ = ["no_delay", "send_now"]

#: Requests in flight on the fast path (llmproxy._server keeps count).
active = 0


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


def send_now(transport: Any) -> None:
    """Send ``transport``'s buffered bytes now, if it is plain TCP.

    Nothing is done for other transports (TLS, tests' fakes) or for one that
    is closing: there the reactor's own turn must see the end of the
    buffer, since that is when it finishes the close. A send error is left
    for the reactor too: the transport is still registered for writing, so
    its next ``doWrite`` reports the error and the connection is lost as
    usual.

    Args:
        transport: The transport just written to.
    """
    if active > 1:
        return
    do_write = getattr(transport, "doWrite", None)
    if do_write is None or transport.disconnecting or not transport.connected:
        return
    if getattr(transport, "TLS", False):
        return
    do_write()
