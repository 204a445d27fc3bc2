"""The outbound side: the Agent that reaches upstreams, and its pool.

Every upstream request leaves through the Agent built here, over one
persistent :class:`HTTPConnectionPool`, closed on shutdown by
:func:`close_pool`.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from llmproxy.config import Config

__all__ = ["Egress", "build_egress", "close_pool"]

#: Seconds that closing the pool may take before the daemon stops anyway.
CLOSE_TIMEOUT = 5.0


@attrs.frozen
class Egress:
    """The outbound machinery for one configuration.

    Attributes:
        agent: Sends requests to upstreams.
        pool: The persistent connection pool behind :attr:`agent`.
    """

    agent: IAgent
    pool: HTTPConnectionPool


def build_egress(config: Config, reactor: Any) -> Egress:
    """Build the Agent and its persistent pool.

    Args:
        config: The configuration (``pool`` and ``timeouts`` are read).
        reactor: The reactor to connect with.

    Returns:
        The agent and its pool.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = config.pool.max_per_host
    pool.cachedConnectionTimeout = config.pool.idle_timeout
    agent = Agent(reactor, connectTimeout=config.timeouts.connect, pool=pool)
    return Egress(agent=agent, pool=pool)


def close_pool(pool: HTTPConnectionPool, reactor: Any) -> Deferred[None]:
    """Close a pool's idle connections, giving up after a few seconds.

    Args:
        pool: The pool to close.
        reactor: For the time limit.

    Returns:
        Fires when the connections are closed or the time is up.
    """
    d = pool.closeCachedConnections()
    d.addTimeout(CLOSE_TIMEOUT, reactor)
    d.addErrback(lambda _: None)
    return d
