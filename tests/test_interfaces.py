"""Every class that declares a Twisted interface really provides it."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IHostnameResolver,
    IPushProducer,
    IReactorPluggableNameResolver,
    IStreamClientEndpoint,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver
from twisted.web.client import URI
from twisted.application.service import IService
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer
from zope.interface.verify import verifyObject

from llmproxy.config import parse_config_text
from llmproxy.egress import BytesProducer, ConnectTunnelEndpoint, Egress
from llmproxy.proxy import Watched
from llmproxy.logs import RotatingJSONLog, console_observer
from llmproxy.resolver import CachingResolver, ResolvingReactor
from llmproxy.testing.resolver import FakeResolver

CONFIG = 'target_map: {"/": "http://127.0.0.1:1"}\nproxy_url: "http://127.0.0.1:3128"\n'


def egress() -> Egress:
    """An Egress on a memory reactor."""
    reactor = ResolvingReactor(MemoryReactorClock(), FakeResolver())
    return Egress(parse_config_text(CONFIG, environ={}), reactor)


def cases(tmp_path: Any) -> list[tuple[Any, Any]]:
    """(interface, object) pairs to verify."""
    clock = MemoryReactorClock()
    e = egress()
    return [
        (IHostnameResolver, CachingResolver(FakeResolver(), clock)),
        (IHostnameResolver, FakeResolver()),
        (IReactorPluggableNameResolver, ResolvingReactor(clock, FakeResolver())),
        (IBodyProducer, BytesProducer(b"{}")),
        (IAgent, e),
        (IService, e),
        (IAgentEndpointFactory, e.direct_endpoints),
        (IAgentEndpointFactory, e.tunnel_endpoints),
        (IStreamClientEndpoint, ConnectTunnelEndpoint(clock, e.proxy_endpoint, "p:1", "h", 443, None, 1.0)),
        (ILogObserver, RotatingJSONLog(str(tmp_path / "l.log"), reactor=clock, compress=False)),
        (ILogObserver, console_observer("info")),
    ]


def test_declared_interfaces_are_provided(tmp_path: Any) -> None:
    """verifyObject accepts each implementation."""
    for interface, obj in cases(tmp_path):
        assert verifyObject(interface, obj), (interface, obj)


def test_endpoints_are_made_once_per_destination() -> None:
    """Endpoints are reused per destination and way out, bounded in number."""
    e = egress()
    direct, tunnel = e.direct_endpoints, e.tunnel_endpoints
    first = direct.endpointForURI(URI.fromBytes(b"http://a.test:80/x"))
    assert direct.endpointForURI(URI.fromBytes(b"http://a.test/y")) is first
    assert direct.endpointForURI(URI.fromBytes(b"https://a.test:80/y")) is not first
    assert tunnel.endpointForURI(URI.fromBytes(b"https://a.test:80/y")) is not first
    for i in range(direct.MAX + 10):
        direct.endpointForURI(URI.fromBytes(b"http://h%d.test/" % i))
    assert len(direct.table) == direct.MAX


def test_stream_watch_is_a_push_producer() -> None:
    """The client's producer wrapper is a push producer."""
    assert IPushProducer.implementedBy(Watched)
