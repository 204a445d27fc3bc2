"""The daemon's reactor loop without a logging context per socket event.

Twisted's epoll reactor calls every socket event through
``twisted.python.log.callWithLogger``: it asks the selectable for its log
prefix and runs the event inside ``callWithContext({"system": prefix})``.
That context only names the connection in the ``system`` field of *legacy*
log events (``twisted.python.log``) emitted during the event; llmproxy logs
through ``twisted.logger`` and names requests by id. On the proxy's hot
path (a few socket events per request, one per streamed chunk) those
wrappers measured 8-13 % of the daemon's CPU.

:func:`lighten` replaces the loop's poll step on the running epoll reactor
(the one ``twistd`` installed) with the same step minus the wrappers:
events still go to the reactor's own ``_doReadOrWrite``, which catches and
logs what a protocol raises and disconnects it, and anything escaping that
is logged here as ``callWithLogger`` would, so the loop never dies of it.
A plain read event (most of them: one per request and per streamed chunk)
is handled inline the way ``_doReadOrWrite`` handles it (``doRead``, a
raised exception logged where the reactor logs it, the selectable
disconnected with what it returned or raised), which spares a call and
its flag tests per event (about 2 % of the instructions under a stream
load); every other event goes to the reactor's own dispatch. For a plain
TCP connection the loop also does what ``tcp.Connection.doRead`` does
(``recv``, then the protocol's ``dataReceived``; an empty read is the
peer's close), which spares two more calls per event (about 1.5 %).
The step also sends the writes :mod:`llmproxy._io` held (before polling:
those of timers; after the events: theirs), which spares a ``callLater(0)``
per iteration, and then closes the connections ``_io.lose`` left for it.
And while the reactor's loop has nothing to do (no timer due, no thread
call, no stop) the step polls again at once instead of returning: the
loop's own bookkeeping (``runUntilCurrent``, ``timeout``) then runs only
when it has work, not after every batch of events (about 5 % of the
instructions under a stream load). Timers the events made join the
reactor's heap in the step, as ``timeout()`` would add them (another 5 %:
a request makes three or four, mostly cancelled later); the step returns
when one is due, or when enough are cancelled that the reactor's loop
would rebuild its heap without them.
Only an ``EPollReactor`` whose poll step and internals are exactly the
ones this was written against is changed; any other reactor (or a Twisted
whose internals moved) is left alone.

Used by the twistd plugin only: an application embedding llmproxy keeps
its reactor as it is.
"""

from __future__ import annotations

import errno
import select
from errno import EWOULDBLOCK
from typing import Any

from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger
from twisted.python import log as legacy_log

from llmproxy import _io
from llmproxy._io import settle

__all__ = ["lighten"]

#: The reactor's attributes the poll step reads to tell whether its loop
#: has work (private to Twisted; without any of them nothing is changed).
_LOOP_STATE = ("_newTimedCalls", "threadCallQueue", "_justStopped", "_pendingTimedCalls",
               "running", "_cancellations", "_insertNewDelayedCalls")
#: A plain read event (anything else goes through the reactor's dispatch).
_IN = select.EPOLLIN if hasattr(select, "EPOLLIN") else -1
#: epoll's longest timeout in seconds (milliseconds in a C int), as Twisted.
_LONGEST = 2147483.0

log = Logger()


def _plain_tcp() -> tuple[type, ...]:
    """The TCP transports whose reads the loop may do itself.

    Those whose ``doRead`` is still ``tcp.Connection``'s (a ``recv`` of
    ``bufferSize`` bytes to the protocol's ``dataReceived``; an empty read
    is the peer's close, ``EWOULDBLOCK`` nothing, any other error a lost
    connection), with the attributes that path reads; none otherwise.
    """
    from twisted.internet import tcp

    connection = getattr(tcp, "Connection", None)
    if connection is None or not hasattr(connection, "bufferSize"):
        return ()
    return tuple(
        kind for kind in (getattr(tcp, "Server", None), getattr(tcp, "Client", None))
        if kind is not None and kind.doRead is connection.doRead
        and kind._dataReceived is connection._dataReceived
    )


def lighten(reactor: Any) -> bool:
    """Dispatch ``reactor``'s socket events without per-event log context.

    Args:
        reactor: The reactor that will run.

    Returns:
        Whether the reactor was changed.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if type(reactor) is not EPollReactor or EPollReactor.doIteration is not EPollReactor.doPoll:
        return False
    if reactor.__dict__.get("doIteration") is not None:
        return False  # already changed (by us or someone else)
    poller = getattr(reactor, "_poller", None)
    selectables = getattr(reactor, "_selectables", None)
    dispatch = getattr(reactor, "_doReadOrWrite", None)
    disconnect = getattr(reactor, "_disconnectSelectable", None)
    if (poller is None or not isinstance(selectables, dict) or dispatch is None
            or disconnect is None):
        return False
    if not all(hasattr(reactor, name) for name in _LOOP_STATE):
        return False

    plain_tcp = _plain_tcp()

    def loop_work() -> bool:
        """Whether a thread call is queued or a stop asked."""
        return bool(reactor.threadCallQueue or reactor._justStopped)

    def work_made() -> bool:
        """Whether a timer was added, a thread call queued or a stop asked."""
        return bool(reactor._newTimedCalls) or loop_work()

    def idle_for() -> float | None:
        """How long the next poll may wait, or -1.0: back to the reactor's loop.

        The loop's own step (run due timers and thread calls, work out the
        timeout) is needed only when one of those may be due; otherwise
        the next poll follows at once. A timer the events made joins the
        reactor's heap here, as the reactor's ``timeout()`` would add it,
        and the poll waits for it like for any other: a request makes
        three or four long timers (timeouts it will mostly cancel), and a
        trip through the reactor's loop for each batch that made one
        measured about 5 % of the instructions under a stream load.
        """
        if loop_work() or not reactor.running:
            return -1.0
        if reactor._newTimedCalls:
            reactor._insertNewDelayedCalls()
        pending = reactor._pendingTimedCalls
        if reactor._cancellations > 50 and reactor._cancellations > len(pending) >> 1:
            return -1.0  # the reactor's loop drops cancelled timers (bounded heap)
        if not pending:
            return None
        wait = pending[0].time - reactor.seconds()
        return min(wait, _LONGEST) if wait > 0 else -1.0

    def do_poll(timeout: float | None) -> None:
        settle()  # what timers and thread calls wrote (and closed) just now
        if work_made():
            timeout = 0  # a close's connectionLost made work: no waiting for it
        while True:
            try:
                events = poller.poll(-1 if timeout is None else timeout, len(selectables))
            except OSError as e:
                if e.errno == errno.EINTR:
                    return
                raise
            try:
                for fd, event in events:
                    selectable = selectables.get(fd)
                    if selectable is None:
                        continue
                    try:
                        if event == _IN and selectable.fileno() != -1:
                            # A read event, as _doReadOrWrite handles it.
                            try:
                                if (type(selectable) in plain_tcp and selectable.connected
                                        and not selectable._aborting):
                                    # What tcp.Connection.doRead does. (An abort
                                    # and a connect in progress replace doRead
                                    # on the connection: not connected, or
                                    # aborting. Reading __dict__ instead would
                                    # turn the object's inline attribute values
                                    # into a dict, slowing every later access.)
                                    try:
                                        data = selectable.socket.recv(selectable.bufferSize)
                                    except OSError as e:
                                        why = None if e.args[0] == EWOULDBLOCK else CONNECTION_LOST
                                    else:
                                        if data:
                                            selectable.protocol.dataReceived(data)
                                            why = None
                                        else:
                                            why = CONNECTION_DONE
                                else:
                                    why = selectable.doRead()
                            except BaseException as e:  # noqa: BLE001 - as Twisted
                                why = e
                                legacy_log.err()  # where the reactor logs it
                            if why:
                                disconnect(selectable, why, True)
                        else:
                            dispatch(selectable, fd, event)
                    except KeyboardInterrupt:
                        raise
                    except BaseException:
                        log.failure("while handling a socket event of {selectable!r}",
                                    selectable=selectable)
            finally:
                settle()  # what the events wrote, together (then the closes)
            timeout = idle_for()
            if timeout is not None and timeout < 0:
                return

    reactor.doIteration = do_poll
    # Closes still pending at shutdown happen with the reactor's own
    # (disconnectAll): a pending close is neither reading nor writing.
    reactor.addSystemEventTrigger("during", "shutdown", settle)
    _io.flushing_loop = reactor
    return True
