"""What an exchange needs of the proxy resource that started it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent

from llmproxy.config import TimeoutsConfig
from llmproxy.limits import Prices
from llmproxy.metrics import Metrics
from llmproxy.proxy._admit import Guard
from llmproxy.routing import Router


class Host(Protocol):
    """What an exchange needs of the proxy resource that started it."""

    router: Router
    agent: IAgent
    via_agents: Mapping[str, IAgent]
    clock: IReactorTime
    timeouts: TimeoutsConfig
    metrics: Metrics | None
    access_log: bool
    guard: Guard
    max_retry_wait: float
    stream_usage: str
    prices: Prices | None
    worker: int | None

    def finished(self, exchange: Any) -> None:
        """``exchange`` is over."""
