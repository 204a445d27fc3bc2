"""Name resolution for the outbound side.

:class:`ResolvingReactor` hands a chosen :class:`IHostnameResolver` to
everything that connects through it: ``HostnameEndpoint`` asks
``reactor.nameResolver`` only when the reactor declares
``IReactorPluggableNameResolver``, so the wrapper declares it and forwards
everything else to the real reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHostnameResolver, IReactorPluggableNameResolver
from zope.interface import directlyProvides, providedBy

__all__ = ["ResolvingReactor"]


class ResolvingReactor:
    """A reactor that resolves host names with a resolver of our choice.

    Attributes:
        nameResolver: The resolver HostnameEndpoint uses.
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        """Wrap a reactor.

        Args:
            reactor: The real reactor; every other call goes to it.
            resolver: The resolver to use for host names.
        """
        self._reactor = reactor
        self.nameResolver = resolver
        directlyProvides(self, providedBy(reactor), IReactorPluggableNameResolver)

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        """Replace the resolver.

        Args:
            resolver: The new resolver.

        Returns:
            The previous resolver.
        """
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
