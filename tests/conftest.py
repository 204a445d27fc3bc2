"""Shared fixtures: the reactor, loopback listeners, and a failure trap."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted
from raw_http import Gateways, ScriptedBytes, RawServer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.config import Config, parse_config_text
from llmproxy.resolver import ResolvingReactor
from llmproxy.testing.resolver import FakeResolver
from llmproxy.app import Gateway
from llmproxy.web import build_site

#: Seconds any single wait in a loopback test may take.
WAIT = 10.0


@pytest.fixture(scope="session")
def reactor() -> Any:
    """The reactor pytest-twisted runs the tests on."""
    from twisted.internet import reactor as global_reactor

    return global_reactor


@pytest.fixture(autouse=True)
def fail_on_logged_failures(request: pytest.FixtureRequest) -> Any:
    """Fail the test if anything logged a failure (an unhandled error).

    Tests that provoke a logged failure on purpose mark themselves with
    ``@pytest.mark.allow_logged_failures``.
    """
    failures: list[dict] = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)
    if failures and not request.node.get_closest_marker("allow_logged_failures"):
        details = "\n".join(e["log_failure"].getTraceback() for e in failures)
        pytest.fail(f"failures were logged:\n{details}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_logged_failures: the test logs failures on purpose"
    )


def timeout(d: Deferred, reactor: Any, seconds: float = WAIT) -> Deferred:
    """Bound a wait: ``await timeout(d, reactor)``."""
    return d.addTimeout(seconds, reactor)


class AccessRecords(list):
    """Access records as they are logged; ``wait(n)`` fires at the n-th."""

    def __init__(self) -> None:
        super().__init__()
        self._waits: list[tuple[int, Deferred[None]]] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") != "llmproxy.access":
            return
        self.append(event)
        ready = [(n, d) for n, d in self._waits if len(self) >= n]
        self._waits = [(n, d) for n, d in self._waits if len(self) < n]
        for _, d in ready:
            d.callback(None)

    def wait(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self) >= count:
            d.callback(None)
        else:
            self._waits.append((count, d))
        return d


@pytest.fixture
def access() -> Iterator[AccessRecords]:
    """The access records logged during the test."""
    records = AccessRecords()
    globalLogPublisher.addObserver(records)
    yield records
    globalLogPublisher.removeObserver(records)


class Upstreams:
    """Fake upstreams started on loopback for one test."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.ports: list[Any] = []

    async def start(self, interface: str = "127.0.0.1") -> tuple[Any, str]:
        """Start one fake upstream; returns it and its base URL."""
        from llmproxy.testing.upstream import listen

        upstream, port = await listen(
            self.reactor, f"tcp:0:interface={interface}"
        )
        self.ports.append(port)
        return upstream, f"http://{interface}:{port.getHost().port}"

    async def close(self) -> None:
        for port in self.ports:
            await port.stopListening()


@pytest_twisted.async_yield_fixture
async def upstreams(reactor: Any) -> AsyncIterator[Upstreams]:
    """A factory of fake upstreams, stopped after the test."""
    pool = Upstreams(reactor)
    yield pool
    await pool.close()


class Proxies:
    """llmproxy instances started on loopback for one test."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.resolver = FakeResolver({"localhost": ["127.0.0.1"]})
        self.ports: list[Any] = []
        self.sites: list[Any] = []
        self.roots: list[Any] = []
        self.gateways: list[Gateway] = []

    async def start(self, config: Config | str, endpoint: str | None = None) -> str:
        """Serve ``config`` on 127.0.0.1; returns the proxy's base URL.

        Host names in the config resolve through :attr:`resolver`. With
        ``endpoint`` (a server endpoint string on 127.0.0.1, port 0) the
        site listens there instead of on a plain TCP port.
        """
        if isinstance(config, str):
            config = parse_config_text(config, environ={})
        wrapped = ResolvingReactor(self.reactor, self.resolver)
        gateway = Gateway(config, wrapped)
        gateway.startService()
        self.gateways.append(gateway)
        root = gateway.resource
        site = build_site(config, self.reactor, root)
        if endpoint is None:
            listening = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        else:
            listening = serverFromString(self.reactor, endpoint)
        port = await listening.listen(site)
        site.watch_port(port)  # as the daemon's listeners do (max_connections)
        self.ports.append(port)
        self.sites.append(site)
        self.roots.append(root)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def close(self) -> None:
        for port in self.ports:
            await port.stopListening()
        for gateway in self.gateways:
            await gateway.stopService()


@pytest_twisted.async_yield_fixture
async def proxies(reactor: Any) -> AsyncIterator[Proxies]:
    """A factory of proxies, stopped after the test."""
    pool = Proxies(reactor)
    yield pool
    await pool.close()


@pytest_twisted.async_yield_fixture
async def loopback(reactor: Any) -> AsyncIterator[Any]:
    """``await loopback(factory)``: serve it on 127.0.0.1, port 0; its base
    URL. The ports are stopped after the test."""
    ports: list[Any] = []

    async def listen(factory: Any) -> str:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    yield listen
    for port in ports:
        await port.stopListening()


@pytest.fixture
def raw_servers(loopback: Any) -> Any:
    """``await raw_servers(answers_per_connection)``: a :class:`RawServer` on
    loopback and its base URL, stopped after the test."""

    async def start(answers_per_connection: int) -> tuple[RawServer, str]:
        server = RawServer(answers_per_connection)
        return server, await loopback(server)

    return start


@pytest_twisted.async_yield_fixture
async def client(reactor: Any) -> AsyncIterator[Agent]:
    """An HTTP client Agent with its own pool, closed after the test."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    yield Agent(reactor, pool=pool)
    await pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def gateways(reactor: Any, upstreams: Any, proxies: Any) -> AsyncIterator[Gateways]:
    """Proxies in front of fake upstreams; raw connections aborted after the test."""
    harness = Gateways(reactor, upstreams, proxies)
    yield harness
    await harness.close()


@pytest.fixture
def scripted_bytes(loopback: Any) -> Any:
    """A factory of :class:`ScriptedBytes` upstreams on loopback."""

    async def start(answer: bytes, close: bool | str = True) -> tuple[ScriptedBytes, str]:
        server = ScriptedBytes(answer, close)
        return server, await loopback(server)

    return start
