"""``twistd llmproxy``: options and the service tree.

``makeService`` loads the config and builds a MultiService: the public
listener, the demo upstream when ``demo_upstream`` is set, and a service that
closes the upstream connection pool on stop.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from llmproxy.config import Config, ConfigError, load_config
from llmproxy.web import build_resource, build_site

__all__ = ["Options", "makeService"]

DEFAULT_CONFIG = "etc/config.yml"


def _fail(message: str) -> SystemExit:
    """A one-line, traceback-free exit for a user's mistake."""
    return SystemExit(f"llmproxy: {message}")


class Options(usage.Options):
    """Command-line options of ``twistd llmproxy``."""

    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The YAML config file."],
    ]

    def postOptions(self) -> None:
        """Load and validate the config file.

        A bad config exits with one line naming the key; twistd's own
        UsageError handling would print the whole usage text around it.
        """
        try:
            self.loaded: Config = load_config(self["config"])
        except ConfigError as e:
            raise _fail(f"config error: {e}") from None


class _CloseService(Service):
    """Runs a close callable when the daemon stops."""

    def __init__(self, close: Any) -> None:
        self._close = close

    def stopService(self) -> Any:
        super().stopService()
        return self._close()


def _listener(reactor: Any, description: str, factory: Any, key: str) -> Service:
    """A service listening on an endpoint string, validated now."""
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise _fail(f"config error: {key}: not a valid endpoint {description!r}: {e}") from None
    service = StreamServerEndpointService(endpoint, factory)
    # Fail startup (and so twistd) if the port cannot be bound.
    service._raiseSynchronously = True
    return service


def makeService(options: Options) -> MultiService:
    """Build the daemon's services from parsed options.

    Args:
        options: Parsed :class:`Options` (the config is loaded already).

    Returns:
        The MultiService that twistd runs.
    """
    from twisted.internet import reactor

    config = getattr(options, "loaded", None) or load_config(options["config"])
    return build_service(config, reactor)


def build_service(config: Config, reactor: Any) -> MultiService:
    """Build the daemon's services for a config.

    Args:
        config: The validated configuration.
        reactor: The reactor to run on.

    Returns:
        A MultiService with the demo upstream (if configured), the public
        listener and the pool closer.
    """
    top = MultiService()
    if config.demo_upstream is not None:
        from llmproxy.testing.upstream import FakeUpstreamService

        demo = FakeUpstreamService(reactor, config.demo_upstream)
        demo.setName("demo-upstream")
        demo.setServiceParent(top)
    root = build_resource(config, reactor)
    listener = _listener(reactor, config.listen, build_site(config, reactor, root), "listen")
    listener.setName("web")
    listener.setServiceParent(top)
    closer = _CloseService(root.close)
    closer.setName("upstream-pool")
    closer.setServiceParent(top)
    return top


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run me with: twistd -n llmproxy --config FILE")
