"""Which upstream hosts bypass the outbound proxy.

The stdlib's no_proxy helper knows neither CIDRs nor IPv6, so this is ours.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmproxy.net import NetworkSet, parse_ip

__all__ = ["NoProxy"]


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
