"""The outbound side: how each upstream request leaves the machine.

:class:`Egress` is an ``IAgent``: per request it decides direct, proxy
(``http://`` through ``proxy_url``, Twisted's ``ProxyAgent``) or tunnel
(``https://`` through the proxy's CONNECT), each over its own
``HTTPConnectionPool``, and answers with a :class:`RoutedResponse` that says
which way it went. It is a Twisted service too: stopping it closes the
pools. :class:`NoProxy` matches ``no_proxy`` lists; :class:`TunnelError`
and :class:`TunnelTimeout` are what a proxy refusing or ignoring CONNECT
fails with.
"""

from __future__ import annotations

from llmproxy.egress._agent import DIRECT, PROXY, Egress, close_pool
from llmproxy.egress._connect import ConnectTunnelEndpoint, TunnelError, TunnelTimeout
from llmproxy.egress._endpoints import DirectEndpoints, TLSSetupError, TunnelEndpoints, tls_policy
from llmproxy.egress._keepalive import ConnectionWatch, TLSHandshakeTimeout
from llmproxy.egress._noproxy import NoProxy
from llmproxy.egress._body import BytesProducer, Patch
from llmproxy.egress._way import RoutedResponse, StaleConnectionRetried

__all__ = [
    "DIRECT",
    "PROXY",
    "BytesProducer",
    "Patch",
    "ConnectTunnelEndpoint",
    "ConnectionWatch",
    "DirectEndpoints",
    "Egress",
    "NoProxy",
    "RoutedResponse",
    "StaleConnectionRetried",
    "TLSHandshakeTimeout",
    "TLSSetupError",
    "TunnelEndpoints",
    "TunnelError",
    "TunnelTimeout",
    "close_pool",
    "tls_policy",
]
