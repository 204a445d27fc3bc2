"""A fake host name resolver: test names map to loopback addresses.

Tests must never send traffic outside 127.0.0.0/8 or ::1, so they resolve
names such as ``api.external.test`` through this table instead of DNS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from zope.interface import implementer

__all__ = ["FakeResolver"]


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Resolution is immediate; there is nothing to cancel."""


@implementer(IHostnameResolver)
class FakeResolver:
    """Resolves names from a fixed table; unknown names do not resolve.

    Attributes:
        hosts: Name to addresses (IPv4 or IPv6 literals).
        lookups: Every name asked for, in order.
    """

    def __init__(self, hosts: Mapping[str, Sequence[str]] | None = None) -> None:
        """Create the resolver.

        Args:
            hosts: Name to addresses. IP literals always resolve to
                themselves.
        """
        self.hosts = {k.lower(): list(v) for k, v in (hosts or {}).items()}
        self.lookups: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """Resolve ``hostName`` from the table, synchronously."""
        self.lookups.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        name = hostName.lower()
        addresses = self.hosts.get(name)
        if addresses is None and _is_ip(name):
            addresses = [name]
        for ip in addresses or ():
            kind = IPv6Address if ":" in ip else IPv4Address
            if addressTypes is None or kind in addressTypes:
                resolutionReceiver.addressResolved(kind("TCP", ip, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True
