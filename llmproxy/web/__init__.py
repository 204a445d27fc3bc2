"""The HTTP face: the root resource, the admin resource and the Site.

:class:`RootResource` answers ``/healthz`` and ``/readyz`` itself and hands
every other path to the proxy resource; :func:`build_admin_resource` serves
metrics, budgets and upstream health on the admin listener;
:class:`LLMProxySite` (:func:`build_site`) is the twisted.web ``Site`` with
the limits a gateway facing untrusted clients needs. :mod:`llmproxy.app`
builds them from a config.
"""

from __future__ import annotations

from llmproxy.web._admin import build_admin_resource
from llmproxy.web._metrics import MetricsResource
from llmproxy.web._root import RootResource
from llmproxy.web._site import (
    LLMProxySite,
    build_site,
    default_max_connections,
    default_max_connections_per_client,
)

__all__ = [
    "LLMProxySite",
    "MetricsResource",
    "RootResource",
    "build_admin_resource",
    "build_site",
    "default_max_connections",
    "default_max_connections_per_client",
]
