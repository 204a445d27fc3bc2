"""The daemon's lighter reactor loop (llmproxy._loop).

Each test builds its own epoll reactor (never run; its loop is stepped by
hand) with a socket pair, so the global reactor is untouched. The daemon
itself runs on the lightened loop in every twistd test (test_tap).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from llmproxy._loop import lighten
from helpers import step_until

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class _Reader(FileDescriptor):
    """Reads one end of a socket pair; ``fail`` makes its handlers raise."""

    def __init__(self, reactor: Any, sock: socket.socket, fail: str = "") -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.received = b""
        self.lost: list[Any] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> Any:
        if self.fail == "doRead":
            raise RuntimeError("doRead failed")
        data = self.sock.recv(4096)
        if not data:
            return main.CONNECTION_DONE  # the peer closed, as Twisted's TCP
        self.received += data
        return None

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)
        if self.fail:
            raise RuntimeError("connectionLost failed too")


@pytest.fixture(autouse=True)
def _own_io_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's lighten sets llmproxy._io's loop; nothing of it outlives
    the test (nor do closes a failed test left pending)."""
    from collections import deque

    from llmproxy import _io

    monkeypatch.setattr(_io, "flushing_loop", None)
    monkeypatch.setattr(_io, "_closing", deque())


@pytest.fixture
def pair() -> Any:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_lightened_loop_delivers_socket_events(pair: Any) -> None:
    """After lighten, a step of the loop still delivers a readable socket's
    bytes to its reader, and a step with nothing ready returns."""
    reactor = epollreactor.EPollReactor()
    assert lighten(reactor) is True
    reader = _Reader(reactor, pair[0])
    reactor.addReader(reader)
    pair[1].sendall(b"hello")
    reactor.doIteration(1.0)
    assert reader.received == b"hello"
    reactor.doIteration(0)
    assert reader.received == b"hello"
    reactor.removeReader(reader)


def test_a_reader_that_reports_a_close_is_disconnected(pair: Any) -> None:
    """When a reader's doRead says its peer closed, the lightened loop
    removes it and tells it why, once, as the reactor's own dispatch does."""
    reactor = epollreactor.EPollReactor()
    lighten(reactor)
    reader = _Reader(reactor, pair[0])
    reactor.addReader(reader)
    pair[1].sendall(b"last words")
    pair[1].shutdown(socket.SHUT_WR)
    reactor.doIteration(1.0)
    reactor.doIteration(0)
    assert reader.received == b"last words"
    assert len(reader.lost) == 1 and reader.lost[0].check(ConnectionDone)
    assert reader not in reactor.getReaders()


class _Log:
    """Collects what the loop logs."""

    def __init__(self, into: list[dict]) -> None:
        self.into = into

    def failure(self, format: str, **kw: Any) -> None:
        self.into.append({"format": format, "failure": Failure(), **kw})


def test_a_failing_handler_is_logged_and_the_loop_goes_on(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader whose doRead raises is disconnected (as Twisted does); when
    its connectionLost raises too, that is logged, not raised out of the
    loop, and other sockets are still served."""
    caught: list[dict] = []
    monkeypatch.setattr("llmproxy._loop.log", _Log(caught))
    reactor = epollreactor.EPollReactor()
    lighten(reactor)
    bad = _Reader(reactor, pair[0], fail="doRead")
    reactor.addReader(bad)
    other_a, other_b = socket.socketpair()
    try:
        good = _Reader(reactor, other_a)
        reactor.addReader(good)
        pair[1].sendall(b"x")
        other_b.sendall(b"still served")
        errors: list[Any] = []
        monkeypatch.setattr("twisted.python.log.err", lambda *a, **k: errors.append(a))
        reactor.doIteration(1.0)
        reactor.doIteration(0)
        assert len(bad.lost) == 1 and bad not in reactor.getReaders()
        assert caught and "connectionLost failed too" in repr(caught[0]["failure"].value)
        assert good.received == b"still served"
        reactor.removeReader(good)
    finally:
        other_a.close()
        other_b.close()


def test_other_reactors_and_a_second_call_are_left_alone() -> None:
    """A reactor that is not epoll is not changed; neither is one changed
    already."""
    assert lighten(MemoryReactorClock()) is False
    reactor = epollreactor.EPollReactor()
    assert lighten(reactor) is True
    step = reactor.doIteration
    assert lighten(reactor) is False
    assert reactor.doIteration is step


def test_the_loop_sends_held_writes_without_a_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load (writes held), the lightened loop itself sends what was
    written: during an event (after that poll) or from a timer (before the
    next poll), with no DelayedCall scheduled for it."""
    from twisted.internet.protocol import Factory, Protocol

    from llmproxy import _io

    reactor = epollreactor.EPollReactor()
    lighten(reactor)
    monkeypatch.setattr(_io, "active", 2)  # more than one request in flight
    accepted: list[Protocol] = []

    class Hello(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)
            _io.write_now(self.transport, b"held ")

    port = reactor.listenTCP(0, Factory.forProtocol(Hello), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        step_until(reactor, lambda: accepted)
        assert reactor.getDelayedCalls() == []
        assert client.recv(100) == b"held "
        _io.write_now(accepted[0].transport, b"from a timer")
        assert reactor.getDelayedCalls() == []
        reactor.doIteration(0)
        assert client.recv(100) == b"from a timer"
    finally:
        client.close()
        for protocol in accepted:
            protocol.transport.abortConnection()
        port.stopListening()
        reactor.doIteration(0)


@pytest.mark.parametrize("held", [True, False], ids=["held-then-abort", "abort-then-write"])
def test_nothing_written_around_an_abort_reaches_the_peer(
    monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    """abortConnection drops what is written: a held write (a request
    cancelled in the same step) and a write after the abort (a chunk for a
    client just dropped) never reach the peer."""
    from twisted.internet.protocol import Factory, Protocol

    from llmproxy import _io

    reactor = epollreactor.EPollReactor()
    lighten(reactor)
    monkeypatch.setattr(_io, "active", 2 if held else 0)
    accepted: list[Protocol] = []

    class Cancelled(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)
            if held:
                _io.write_now(self.transport, b"POST /v1/cancelled HTTP/1.1\r\n\r\n")
                self.transport.abortConnection()
            else:
                self.transport.abortConnection()
                _io.write_now(self.transport, b"data: late chunk\n\n")

    port = reactor.listenTCP(0, Factory.forProtocol(Cancelled), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        # (with the abort's connectionLost, a timer)
        step_until(reactor, lambda: accepted and not accepted[0].transport.connected)
        try:
            assert client.recv(100) == b""
        except ConnectionResetError:
            pass  # the abort's reset: nothing came before it
    finally:
        client.close()
        port.stopListening()
        reactor.doIteration(0)


def _closing_server(reactor: Any, on_data: Any) -> tuple[Any, list[Any], list[Any]]:
    """A TCP server on ``reactor`` calling ``on_data(transport)`` when a
    client sends anything; returns the port, the protocols and the reasons
    their connections were lost."""
    from twisted.internet.protocol import Factory, Protocol

    accepted: list[Protocol] = []
    lost: list[Any] = []

    class Server(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

        def dataReceived(self, data: bytes) -> None:
            on_data(self.transport)

        def connectionLost(self, reason: Any) -> None:
            lost.append(reason)

    port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
    return port, accepted, lost


def _read_to_eof(reactor: Any, client: socket.socket, steps: int = 400) -> bytes:
    """What the client receives until the server closes, stepping the loop."""
    client.setblocking(False)
    received = []
    for _ in range(steps):
        reactor.doIteration(0.01)
        reactor.runUntilCurrent()
        while True:
            try:
                data = client.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                return b"".join(received)
            received.append(data)
    raise AssertionError("the server never closed the connection")


def _accepted(reactor: Any, port: Any, accepted: list[Any]) -> socket.socket:
    """A client connected to ``port``, once its server side is accepted."""
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        step_until(reactor, lambda: accepted)
    except AssertionError:
        client.close()
        raise
    return client


def test_a_close_with_nothing_queued_ends_with_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection closed (by _io.lose) with everything sent is closed by
    the end of the same step, as a clean close: the client has the whole
    answer, then end of file, and no second poll was needed."""
    from llmproxy import _io

    reactor = epollreactor.EPollReactor()
    lighten(reactor)
    monkeypatch.setattr(_io, "active", 0)

    def answer(transport: Any) -> None:
        _io.write_now(transport, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        _io.lose(transport)

    port, accepted, lost = _closing_server(reactor, answer)
    client = _accepted(reactor, port, accepted)
    try:
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # on loopback: readable now
        reactor.doIteration(1.0)  # the request's step closes, too
        assert len(lost) == 1 and lost[0].check(ConnectionDone)
        assert client.recv(100).endswith(b"\r\n\r\nok") and client.recv(100) == b""
    finally:
        client.close()
        port.stopListening()
        reactor.doIteration(0)


@pytest.mark.parametrize("when", ["held-before", "queued-before", "written-after"])
def test_a_close_sends_everything_written_first(
    monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """What is held for the end of the step, what the socket could not take
    at once, and what is written between the close and the end of the step
    all still reach the client, in order, before its end of file."""
    from llmproxy import _io

    reactor = epollreactor.EPollReactor()
    lighten(reactor)
    monkeypatch.setattr(_io, "active", 2 if when == "held-before" else 0)
    big = bytes(range(256)) * (64 * 1024)  # 16 MB: more than a socket buffer

    def answer(transport: Any) -> None:
        if when != "written-after":
            _io.write_now(transport, big)
            _io.lose(transport)
        else:
            _io.write_now(transport, b"head ")
            _io.lose(transport)
            _io.write_now(transport, big)

    port, accepted, lost = _closing_server(reactor, answer)
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        client.sendall(b"go")
        expected = b"head " + big if when == "written-after" else big
        assert _read_to_eof(reactor, client) == expected
        assert len(lost) == 1 and lost[0].check(ConnectionDone)
    finally:
        client.close()
        port.stopListening()
        reactor.doIteration(0)


def test_an_abort_after_a_close_is_one_abort(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection aborted after its close was asked for is lost once, as
    an abort (nothing closes it twice)."""
    from twisted.internet.error import ConnectionAborted

    from llmproxy import _io

    reactor = epollreactor.EPollReactor()
    lighten(reactor)
    monkeypatch.setattr(_io, "active", 0)

    def answer(transport: Any) -> None:
        _io.lose(transport)
        transport.abortConnection()

    port, accepted, lost = _closing_server(reactor, answer)
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        client.sendall(b"go")
        step_until(reactor, lambda: lost)  # the abort's connectionLost: a timer
        reactor.doIteration(0)
        reactor.runUntilCurrent()
        assert len(lost) == 1 and lost[0].check(ConnectionAborted)
    finally:
        client.close()
        port.stopListening()
        reactor.doIteration(0)


class _Polls:
    """An epoll object that records the timeout of every poll."""

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.timeouts: list[float] = []

    def poll(self, timeout: float, maxevents: int) -> Any:
        self.timeouts.append(timeout)
        return self.poller.poll(timeout, maxevents)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.poller, name)


def test_work_made_by_a_close_from_a_timer_is_not_kept_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A close asked for outside a socket event (by a timer, say) happens
    before the next poll; when its connectionLost schedules work (a
    callLater(0), as an abort does), that poll does not wait."""
    from llmproxy import _io

    reactor = epollreactor.EPollReactor()
    polls = reactor._poller = _Polls(reactor._poller)
    lighten(reactor)
    monkeypatch.setattr(_io, "active", 0)
    scheduled: list[Any] = []

    port, accepted, lost = _closing_server(reactor, lambda transport: None)
    client = _accepted(reactor, port, accepted)
    try:
        original = accepted[0].connectionLost

        def then_schedule(reason: Any) -> None:
            original(reason)
            scheduled.append(reactor.callLater(0, lambda: None))

        accepted[0].connectionLost = then_schedule
        _io.lose(accepted[0].transport)  # as a timer would, between steps
        reactor.doIteration(5.0)
        assert len(lost) == 1 and lost[0].check(ConnectionDone)
        assert scheduled and polls.timeouts[-1] == 0
        assert client.recv(100) == b""
    finally:
        client.close()
        port.stopListening()
        reactor.doIteration(0)


def test_a_close_pending_at_shutdown_happens_with_the_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A close still pending when the reactor shuts down (asked for by a
    shutdown trigger, say) is done during the shutdown, as the reactor
    disconnects everything else."""
    from llmproxy import _io

    reactor = epollreactor.EPollReactor()
    lighten(reactor)
    monkeypatch.setattr(_io, "active", 0)
    port, accepted, lost = _closing_server(reactor, lambda transport: None)
    client = _accepted(reactor, port, accepted)
    try:
        _io.lose(accepted[0].transport)
        reactor.fireSystemEvent("shutdown")
        assert len(lost) == 1 and lost[0].check(ConnectionDone)
        assert client.recv(100) == b""
    finally:
        client.close()


class _Scripted(_Reader):
    """Runs ``actions[n]`` on its n-th read (counting from 1)."""

    def __init__(self, reactor: Any, sock: socket.socket, actions: dict[int, Any]) -> None:
        super().__init__(reactor, sock)
        self.actions = actions
        self.reads = 0

    def doRead(self) -> Any:
        self.reads += 1
        super().doRead()
        action = self.actions.get(self.reads)
        if action is not None:
            action()
        return None


def test_a_step_keeps_polling_until_a_timer_is_due(pair: Any) -> None:
    """While no timer, thread call or stop is due, one step of the running
    loop polls again at once (no trip through the reactor's loop), and
    returns when the next timer is due."""
    reactor = epollreactor.EPollReactor()
    assert lighten(reactor) is True
    reactor.running = True
    fired: list[int] = []
    reactor.callLater(0.05, fired.append, 1)
    reactor.runUntilCurrent()  # the timer is now pending
    reader = _Scripted(reactor, pair[0], {1: lambda: pair[1].sendall(b" again")})
    reactor.addReader(reader)
    pair[1].sendall(b"hello")
    reactor.doIteration(reactor.timeout())
    assert reader.received == b"hello again" and reader.reads == 2
    assert fired == []
    assert reactor.seconds() >= reactor.getDelayedCalls()[0].getTime()
    reactor.runUntilCurrent()
    assert fired == [1]
    reactor.removeReader(reader)


@pytest.mark.parametrize("work", ["timer", "thread call", "stop"])
def test_a_step_returns_for_work_its_events_made(pair: Any, work: str) -> None:
    """A timer, a thread call or a stop made by a socket event ends the step
    at once, so the reactor's loop runs it without waiting for a poll."""
    reactor = epollreactor.EPollReactor()
    assert lighten(reactor) is True
    reactor.running = True
    fallback = reactor.callLater(5, lambda: None)  # a broken step returns only then
    reactor.runUntilCurrent()
    then = {
        "timer": lambda: reactor.callLater(0, lambda: None),
        "thread call": lambda: reactor.callFromThread(lambda: None),
        "stop": lambda: setattr(reactor, "_justStopped", True),
    }[work]
    reader = _Scripted(reactor, pair[0], {1: lambda: (pair[1].sendall(b" again"), then())})
    reactor.addReader(reader)
    pair[1].sendall(b"hello")
    reactor.doIteration(reactor.timeout())
    assert reader.reads == 1 and reactor.seconds() < fallback.getTime()
    reactor.removeReader(reader)
    fallback.cancel()


def test_a_timer_made_by_an_event_is_waited_for_in_the_step(pair: Any) -> None:
    """A timer a socket event made for later does not end the step: the
    step adds it to the reactor's timers and polls until it is due, and
    the reactor's loop then runs it on time."""
    reactor = epollreactor.EPollReactor()
    assert lighten(reactor) is True
    reactor.running = True
    fired: list[int] = []
    made: list[Any] = []
    reader = _Scripted(reactor, pair[0], {1: lambda: made.append(
        reactor.callLater(0.05, fired.append, 1))})
    reactor.addReader(reader)
    pair[1].sendall(b"hello")
    reactor.doIteration(reactor.timeout())
    assert reader.reads == 1 and fired == []
    assert reactor.getDelayedCalls() == made
    assert reactor.seconds() >= made[0].getTime()  # it waited for the timer
    reactor.runUntilCurrent()
    assert fired == [1]
    reactor.removeReader(reader)


def test_timers_cancelled_in_a_step_do_not_pile_up(pair: Any) -> None:
    """Timers that events make and then cancel (a request's timeouts) end
    the step once there are enough of them, so that the reactor's loop
    drops them from its heap as Twisted does, rather than keeping them
    until they would have been due."""
    reactor = epollreactor.EPollReactor()
    assert lighten(reactor) is True
    reactor.running = True
    fallback = reactor.callLater(2, lambda: None)  # a broken step returns only then
    reactor.runUntilCurrent()
    timers: list[Any] = []

    def make() -> None:
        timers.extend(reactor.callLater(100, lambda: None) for _ in range(100))
        pair[1].sendall(b" again")  # a second read, in the same step

    def cancel() -> None:
        for timer in timers:
            timer.cancel()

    reader = _Scripted(reactor, pair[0], {1: make, 2: cancel})
    reactor.addReader(reader)
    pair[1].sendall(b"hello")
    reactor.doIteration(reactor.timeout())
    assert reader.reads == 2 and reactor.seconds() < fallback.getTime()
    reactor.runUntilCurrent()
    assert reactor._pendingTimedCalls == [fallback]
    reactor.removeReader(reader)
    fallback.cancel()


class _Recorder:
    """A TCP protocol that records what reaches it; ``answer`` is what its
    ``dataReceived`` does with the bytes."""

    def __init__(self, answer: Any = None) -> None:
        from twisted.internet.protocol import Protocol

        recorder = self

        class Recording(Protocol):
            def connectionMade(self) -> None:
                recorder.protocols.append(self)

            def dataReceived(self, data: bytes) -> Any:
                recorder.received += data
                if answer is not None:
                    return answer(data)
                return None

            def connectionLost(self, reason: Failure = main.CONNECTION_DONE) -> None:
                recorder.lost.append(reason)

        self.protocol = Recording
        self.protocols: list[Any] = []
        self.received = b""
        self.lost: list[Failure] = []


def _tcp_pair(reactor: Any, recorder: _Recorder) -> tuple[Any, socket.socket]:
    """A listening port on the hand-stepped reactor and a client accepted
    by it (the server end is a plain tcp.Server)."""
    from twisted.internet.protocol import Factory

    factory = Factory.forProtocol(recorder.protocol)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, _accepted(reactor, port, recorder.protocols)


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_a_tcp_connection_reads_as_twisted_reads_it(ending: str) -> None:
    """On a plain TCP connection the loop reads what tcp.Connection.doRead
    would: every byte to the protocol in order (4 MB, many reads), then the
    peer's close as ConnectionDone or its reset as ConnectionLost, once,
    and the transport is gone from the reactor."""
    from twisted.internet.error import ConnectionLost

    reactor = epollreactor.EPollReactor()
    assert lighten(reactor) is True
    recorder = _Recorder()
    port, client = _tcp_pair(reactor, recorder)
    payload = bytes(range(256)) * (4 * 4096)
    try:
        sent = 0
        client.setblocking(False)
        while sent < len(payload):  # the loop drains while the client writes
            try:
                sent += client.send(payload[sent:sent + 65536])
            except BlockingIOError:
                reactor.doIteration(0.1)
        client.setblocking(True)
        step_until(reactor, lambda: len(recorder.received) == len(payload))
        assert recorder.received == payload
        if ending == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
        step_until(reactor, lambda: recorder.lost)
        reactor.doIteration(0)
        assert len(recorder.lost) == 1
        expected = ConnectionDone if ending == "close" else ConnectionLost
        assert recorder.lost[0].check(expected)
        assert not [r for r in reactor.getReaders() if r is recorder.protocols[0].transport]
    finally:
        client.close()
        port.stopListening()
        reactor.doIteration(0)


def test_a_tcp_protocol_whose_read_raises_is_disconnected_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A protocol whose dataReceived raises is logged where the reactor logs
    it and disconnected with the error, once, and the client sees its
    connection closed; a value returned by dataReceived is ignored, as
    tcp.Connection ignores it."""
    errors: list[Any] = []
    monkeypatch.setattr("twisted.python.log.err", lambda *a, **k: errors.append(a))
    reactor = epollreactor.EPollReactor()
    lighten(reactor)

    def answer(data: bytes) -> Any:
        if data.endswith(b"boom"):
            raise RuntimeError("dataReceived failed")
        return main.CONNECTION_LOST  # not a way to close (any more)

    recorder = _Recorder(answer)
    port, client = _tcp_pair(reactor, recorder)
    try:
        client.sendall(b"fine")
        step_until(reactor, lambda: recorder.received == b"fine")
        reactor.doIteration(0)
        assert recorder.lost == [] and errors == []
        client.sendall(b"boom")
        step_until(reactor, lambda: recorder.lost)
        reactor.doIteration(0)
        assert recorder.received == b"fineboom" and len(recorder.lost) == 1
        assert len(errors) == 1
        assert "dataReceived failed" in str(recorder.lost[0].value)
        try:
            assert client.recv(10) == b""
        except ConnectionResetError:
            pass  # closed with unread bytes: a reset is a close too
    finally:
        client.close()
        port.stopListening()
        reactor.doIteration(0)


@pytest.mark.parametrize("peer", ["sends", "closes"])
def test_an_aborted_tcp_connection_reads_nothing_more(peer: str) -> None:
    """A connection aborted by another connection's event in the same step,
    then written to, reads nothing more in that step even though its own
    read event follows: its protocol gets ConnectionAborted, once, as on
    the reactor's own dispatch (which honours the abort's no-op doRead)."""
    from twisted.internet.error import ConnectionAborted

    reactor = epollreactor.EPollReactor()
    lighten(reactor)
    first = _Recorder()
    port_x, x = _tcp_pair(reactor, first)
    victim = first.protocols[0]

    def abort_the_other(data: bytes) -> None:
        victim.transport.abortConnection()
        victim.transport.write(b"late")  # registers it for writing again

    second = _Recorder(abort_the_other)
    port_y, y = _tcp_pair(reactor, second)
    try:
        y.sendall(b"abort x")  # ready first
        if peer == "sends":
            x.sendall(b"after the abort")
        else:
            x.shutdown(socket.SHUT_WR)
        step_until(reactor, lambda: first.lost)
        reactor.doIteration(0)
        assert first.received == b""
        assert len(first.lost) == 1 and first.lost[0].check(ConnectionAborted)
    finally:
        x.close()
        y.close()
        for protocol in second.protocols:
            protocol.transport.abortConnection()
        port_x.stopListening()
        port_y.stopListening()
        reactor.doIteration(0)
