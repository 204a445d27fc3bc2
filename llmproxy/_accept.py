"""The daemon's listening ports, with a lighter accept loop.

``tcp.Port.doRead`` runs every accept through machinery for its rare
errors: a buffering ``Logger`` context built per call (and two ``Logger``
objects from the port's descriptor), a generator over the accepts, and
``enumerate``. Under a stream load (a new connection per stream) that
measured about 1.6 % of the daemon's instructions. :func:`lighten_port`
gives a listening port the same loop without it: accept until the socket
has no more connections or the port's adaptive batch is done (Twisted's
``numberAccepts``, kept), build each protocol and transport as Twisted
does. Each accept also skips what ``socket.accept`` adds to the system
call: it turns the listener's family and type into enum members (through
``enum``'s lookup machinery) for every new socket. The loop makes the new
socket from the listener's family, type and protocol as read once, as
plain integers. Code that runs once per connection runs cold at a stream
load's rate (100 connections a second), and the enum lookups measured 34
of the 87 microseconds from the accept's start to its new socket, at the
median, under ``streams``.

Accept errors are handled as Twisted handles them: ``EPERM`` skipped,
``ECONNABORTED``, ``ENOBUFS``, ``ENOMEM`` and ``ENFILE`` logged (under
``tcp.Port``'s log namespace) and the batch ended, ``EMFILE`` handed to
``tcp.Port.doRead`` (which frees its reserved descriptor to accept and close
the waiting connections), anything else logged as an unhandled error.

Used by the twistd plugin's listeners only; an application embedding
llmproxy keeps its own ports as they are.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python import log as legacy_log

__all__ = ["lighten_port"]

#: How getnameinfo renders an IPv6 peer (its scope id included), as Twisted.
_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
#: Accept errors Twisted logs and gets past (ending the batch), as tcp.py.
_ACCEPT_ERRORS = (errno.ENOBUFS, errno.ENFILE, errno.ENOMEM, errno.ECONNABORTED)
#: The namespace of tcp.Port's log events (kept for log filters).
_NAMESPACE = "twisted.internet.tcp.Port"


class _Port(tcp.Port):
    """A ``tcp.Port`` whose accept loop does only the common case itself."""

    #: The listener's family, type and protocol as plain integers (what
    #: each accepted socket is made with).
    _new_socket: tuple[int, int, int]

    @property
    def _logger(self) -> Logger:
        # What tcp.Port's own Logger would be: its namespace, this port.
        return Logger(namespace=_NAMESPACE, source=self)

    def doRead(self) -> None:
        accepts = self.numberAccepts
        accepted = 0
        try:
            listener = self.socket
            accept = listener._accept
            family, kind, proto = self._new_socket
            factory = self.factory
            for _ in range(accepts):
                try:
                    # What listener.accept() does, minus the enum lookups.
                    # (Its blocking-mode step applies to a blocking listener
                    # only; Twisted's are non-blocking, and the transport
                    # makes the socket non-blocking anyway.)
                    fd, addr = accept()
                    skt = socket.socket(family, kind, proto, fd)
                except BlockingIOError:
                    break  # no more connections waiting
                except OSError as e:
                    code = e.args[0]
                    if code == errno.EPERM:
                        continue  # netfilter refused it; try the next, as Twisted
                    if code == errno.EMFILE:
                        tcp.Port.doRead(self)  # Twisted's reserved-descriptor dance
                        return
                    if code in _ACCEPT_ERRORS:
                        self._logger.info("Could not accept new connection ({acceptError})",
                                          acceptError=errno.errorcode[code])
                        break
                    raise
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
        Whether it was changed (only a plain ``tcp.Port`` is, which
        includes an ``ssl:`` listener's: its factory does the TLS; a
        subclass, a UNIX port, or a Twisted without the attributes the
        loop uses is left alone).
    """
    if type(port) is not tcp.Port:
        return False
    if not all(hasattr(port, name) for name in
               ("numberAccepts", "sessionno", "socket", "factory", "_buildAddr", "transport")):
        return False
    listener = port.socket
    if not hasattr(listener, "_accept"):
        return False  # not a standard library socket
    port._new_socket = (int(listener.family), int(listener.type), listener.proto)
    port.__class__ = _Port
    return True
