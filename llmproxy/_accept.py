"""The daemon's listening ports, with a lighter accept loop.

``tcp.Port.doRead`` runs every accept through machinery for its rare
errors: a buffering ``Logger`` context built per call (and two ``Logger``
objects from the port's descriptor), a generator over the accepts, and
``enumerate``. Under a stream load (a new connection per stream) that
measured about 1.6 % of the daemon's instructions. :func:`lighten_port`
gives a listening port the same loop without it: accept until the socket
has no more connections or the port's adaptive batch is done (Twisted's
``numberAccepts``, kept), build each protocol and transport as Twisted
does. Any accept error other than "no more connections" (``EMFILE``,
``ENOBUFS``, ``ECONNABORTED``, ``EPERM``...) hands the rest of the call to
``tcp.Port.doRead``, which handles and logs each of them as usual
(``EMFILE`` with its reserved descriptor).

Used by the twistd plugin's listeners only; an application embedding
llmproxy keeps its own ports as they are.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.python import log as legacy_log

__all__ = ["lighten_port"]

#: How getnameinfo renders an IPv6 peer (its scope id included), as Twisted.
_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV


class _Port(tcp.Port):
    """A ``tcp.Port`` whose accept loop does only the common case itself."""

    def doRead(self) -> None:
        accepts = self.numberAccepts
        accepted = 0
        try:
            listener = self.socket
            factory = self.factory
            while accepted < accepts:
                try:
                    skt, addr = listener.accept()
                except BlockingIOError:
                    break  # no more connections waiting
                except OSError:
                    tcp.Port.doRead(self)  # Twisted's handling of each error
                    return
                accepted += 1
                if len(addr) == 4:  # IPv6: with its scope id, as Twisted
                    host = socket.getnameinfo(addr, _NUMERIC)[0]
                    addr = (host, *addr[1:])
                protocol = factory.buildProtocol(self._buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                session = self.sessionno
                self.sessionno = session + 1
                protocol.makeConnection(
                    self.transport(skt, protocol, addr, self, session, self.reactor)
                )
            # Twisted's adaptive batch: grow while every accept succeeds.
            if accepted == accepts:
                self.numberAccepts = accepts + 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:  # noqa: BLE001 - as tcp.Port.doRead
            legacy_log.deferr()


def lighten_port(port: Any) -> bool:
    """Give a listening ``tcp.Port`` the lighter accept loop.

    Args:
        port: What a listen returned.

    Returns:
        Whether it was changed (only a plain ``tcp.Port`` is; a subclass,
        a UNIX or TLS-wrapping port, or a Twisted without the attributes
        the loop uses is left alone).
    """
    if type(port) is not tcp.Port:
        return False
    if not all(hasattr(port, name) for name in
               ("numberAccepts", "sessionno", "socket", "factory", "_buildAddr", "transport")):
        return False
    port.__class__ = _Port
    return True
