"""Which upstream hosts bypass the outbound proxy.

The stdlib's no_proxy helper knows neither CIDRs nor IPv6, so this is ours.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["NetworkSet", "NoProxy", "parse_ip"]

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


class NoProxy:
    """A ``no_proxy`` list: exact names, ``.suffix`` domains, IPs, CIDRs, ``*``.

    ``.example.com`` matches ``example.com`` and every name below it; a bare
    name matches only itself; a CIDR or IP matches IP-literal hosts in it.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        """Parse the entries.

        Args:
            entries: The ``no_proxy`` list as configured.
        """
        self.everything = False
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        cidrs = []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.everything = True
            elif "/" in entry or parse_ip(entry) is not None:
                ip = parse_ip(entry)
                cidrs.append(str(ip) if ip is not None else entry)
            elif entry.startswith("."):
                self.suffixes.append(entry)
            else:
                self.names.add(entry.rstrip("."))
        self.networks = NetworkSet(cidrs)

    def matches(self, host: str) -> bool:
        """Whether ``host`` must be reached directly.

        Args:
            host: The upstream's host (name or IP literal).

        Returns:
            True when an entry covers it.
        """
        if self.everything:
            return True
        host = host.lower().rstrip(".")
        ip = parse_ip(host)
        if ip is not None:
            return ip in self.networks
        if host in self.names:
            return True
        return any(host.endswith(s) or host == s[1:] for s in self.suffixes)
