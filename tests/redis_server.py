"""A real redis-server for loopback tests.

:class:`RedisServer` runs Debian's ``redis-server`` on a free 127.0.0.1 port
with a temporary directory and no persistence. :meth:`RedisServer.stop`
and :meth:`RedisServer.start` stop it and start it again on the same port,
so a test can take Redis away in the middle. Every wait is bounded.

Fixtures (import them into a test module to use them)::

    from redis_server import redis_server  # noqa: F401 (a fixture)

* ``redis_server``: one started server, stopped after the test.
* ``redis_servers``: a factory of servers (with a password, not started
  yet ...), all stopped after the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

#: Seconds any one wait on the server may take.
WAIT = 10.0

#: Bytes of the server's output kept for error messages.
KEEP_OUTPUT = 64 * 1024

#: The server binary (Debian's redis-server package).
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class _Output(ProcessProtocol):
    """Keeps the tail of a process's output and tells when it has ended."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        """Keep ``data`` (the last 64 KiB of it all)."""
        self.output += data
        del self.output[:-KEEP_OUTPUT]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        """Tell whoever waits for the end."""
        self.running = False
        self.ended.callback(None)


class _SetupFactory:
    """What txredisapi's protocol reads from its factory if AUTH fails."""

    isLazy = False

    def __init__(self) -> None:
        self.error: str | None = None

    def stopTrying(self) -> None:
        """Nothing to stop: one connection, made once."""

    def connectionError(self, why: str) -> None:
        """Remember why AUTH or SELECT failed."""
        self.error = why


class RedisServer:
    """One redis-server process on 127.0.0.1, started and stopped at will.

    Attributes:
        port: The TCP port, the same across restarts.
        password: ``--requirepass``, or None.
        directory: The server's working directory.
    """

    def __init__(
        self, reactor: Any, directory: Path, port: int, password: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        """Describe the server (:meth:`start` starts it).

        Args:
            reactor: The running reactor.
            directory: An empty directory for the server's files.
            port: A free port on 127.0.0.1.
            password: Require this password, or None.
            args: More command-line options.
        """
        self.reactor = reactor
        self.directory = directory
        self.port = port
        self.password = password
        self.args = args
        self._process: Any = None
        self._output: _Output | None = None

    @property
    def url(self) -> str:
        """A ``redis://`` URL for this server (with its password, if any)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is running."""
        return self._output is not None and self._output.running

    @property
    def output(self) -> str:
        """The tail of the server's log (for failure messages)."""
        return self._output.output.decode("utf-8", "replace") if self._output else ""

    async def start(self) -> None:
        """Start the server and wait until it accepts connections.

        Raises:
            AssertionError: It exited, or did not accept within 10 s.
        """
        assert not self.running, "already running"
        argv = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "", "--appendonly", "no",
        ]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        argv += list(self.args)
        self._output = _Output()
        self._process = self.reactor.spawnProcess(
            self._output, REDIS_SERVER, argv, env=dict(os.environ), path=str(self.directory)
        )
        deadline = self.reactor.seconds() + WAIT
        while True:
            if not self._output.running:
                raise AssertionError(f"redis-server exited:\n{self.output}")
            try:
                await self._connect_once()
                return
            except Exception:
                if self.reactor.seconds() > deadline:
                    await self.stop()
                    raise AssertionError(
                        f"redis-server never accepted on port {self.port}:\n{self.output}"
                    ) from None
            await deferLater(self.reactor, 0.02, lambda: None)

    async def _connect_once(self) -> None:
        """Connect and disconnect once (bounded), or raise."""
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=1)
        connected = connectProtocol(endpoint, Protocol()).addTimeout(2.0, self.reactor)
        protocol = await connected
        protocol.transport.abortConnection()

    async def stop(self) -> None:
        """Stop the server (SIGTERM; SIGKILL after 10 s) and wait for it to exit."""
        output = self._output
        if output is None or not output.running:
            return
        self._process.signalProcess("TERM")
        try:
            await _wait(output.ended, self.reactor, WAIT)
        except Exception:
            if output.running:
                self._process.signalProcess("KILL")
            await _wait(output.ended, self.reactor, WAIT)

    async def command(self, *args: Any, db: int = 0) -> Any:
        """Run one command on a connection of its own and return the reply.

        Args:
            args: The command and its arguments (str, bytes or numbers).
            db: The database to run it in.

        Returns:
            The reply as txredisapi gives it, bulk strings as bytes.
        """
        from txredisapi import BaseRedisProtocol  # imports the global reactor

        protocol = BaseRedisProtocol(
            charset=None, password=self.password, dbid=db or None, convertNumbers=False
        )
        setup = _SetupFactory()
        protocol.factory = setup
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=5)
        await connectProtocol(endpoint, protocol).addTimeout(WAIT, self.reactor)
        try:
            ready = protocol.whenConnected()
            gone = protocol.whenDisconnected()
            if await _wait(_first_of(ready, gone), self.reactor, WAIT) != 0:
                raise AssertionError(f"could not set up the connection: {setup.error}")
            return await _wait(protocol.execute_command(*args), self.reactor, WAIT)
        finally:
            if protocol.transport is not None and protocol.connected:
                lost = protocol.whenDisconnected()
                protocol.transport.loseConnection()
                await _wait(lost, self.reactor, WAIT)


def _first_of(*waits: Deferred[Any]) -> Deferred[int]:
    """Fire with the index of whichever of ``waits`` fires first (they never fail)."""
    first: Deferred[int] = Deferred()
    for index, d in enumerate(waits):
        d.addCallback(lambda _, i=index: None if first.called else first.callback(i))
    return first


async def _wait(d: Deferred[Any], reactor: Any, seconds: float) -> Any:
    """Await ``d`` for at most ``seconds``."""
    return await d.addTimeout(seconds, reactor)


async def free_port(reactor: Any) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    return number


class RedisServers:
    """Makes redis-servers for one test and stops them all afterwards."""

    def __init__(self, reactor: Any, directory: Path) -> None:
        """Prepare.

        Args:
            reactor: The running reactor.
            directory: Each server gets a subdirectory of it.
        """
        self.reactor = reactor
        self.directory = directory
        self.servers: list[RedisServer] = []

    async def create(self, password: str | None = None, args: tuple[str, ...] = ()) -> RedisServer:
        """A server on a free port, not started yet.

        Args:
            password: Require this password, or None.
            args: More command-line options.
        """
        if not os.access(REDIS_SERVER, os.X_OK):
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        directory = Path(tempfile.mkdtemp(prefix="redis-", dir=self.directory))
        server = RedisServer(
            self.reactor, directory, await free_port(self.reactor), password, args
        )
        self.servers.append(server)
        return server

    async def start(self, password: str | None = None, args: tuple[str, ...] = ()) -> RedisServer:
        """A started server on a free port.

        Args:
            password: Require this password, or None.
            args: More command-line options.
        """
        server = await self.create(password, args)
        await server.start()
        return server

    async def stop_all(self) -> None:
        """Stop every server made here."""
        for server in self.servers:
            await server.stop()


@pytest_twisted.async_yield_fixture
async def redis_servers(reactor: Any, tmp_path: Path) -> AsyncIterator[RedisServers]:
    """A factory of redis-servers, all stopped after the test."""
    servers = RedisServers(reactor, tmp_path)
    try:
        yield servers
    finally:
        await servers.stop_all()


@pytest_twisted.async_yield_fixture
async def redis_server(reactor: Any, tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A started redis-server on 127.0.0.1 (no password), stopped after the test."""
    servers = RedisServers(reactor, tmp_path)
    try:
        yield await servers.start()
    finally:
        await servers.stop_all()
