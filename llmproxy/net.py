"""IP addresses and sets of networks, shared by the limits and egress.

:func:`parse_ip` reads an IP literal (bracketed IPv6 and IPv4-mapped
addresses included); :class:`NetworkSet` answers whether an address falls in
one of its networks. Pure functions of their input, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["NetworkSet", "parse_ip"]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(host: str) -> _Address | None:
    """Parse an IP literal (IPv6 may be bracketed), or return None.

    Args:
        host: A host name or IP literal.

    Returns:
        The address, or None when ``host`` is a name.
    """
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class NetworkSet:
    """A set of IP networks, asked whether it holds an address."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        """Parse the networks.

        Args:
            cidrs: Networks such as ``10.0.0.0/8`` or ``fc00::/7``.
        """
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if isinstance(address, str):
            address = parse_ip(address)
        if address is None:
            return False
        return any(
            address.version == net.version and address in net for net in self.networks
        )
