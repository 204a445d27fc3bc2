"""The client's address: forwarding headers believed only from trusted proxies.

:func:`client_ip` walks ``X-Forwarded-For`` (then ``X-Real-IP``) when the TCP
peer is a trusted reverse proxy, and otherwise answers with the peer itself.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.web.http_headers import Headers

from llmproxy.net import NetworkSet

__all__ = ["client_ip"]

# An IPv4 address in canonical form (as a socket reports a peer).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_address(text: str) -> _Address | None:
    """Parse one address as proxies write it, or return None.

    Accepts ``1.2.3.4``, ``1.2.3.4:port``, ``::1``, ``[::1]`` and
    ``[::1]:port``, with surrounding spaces; IPv4-mapped IPv6 becomes IPv4.
    Zone ids (``fe80::1%eth0``) are not client addresses and are refused.

    Args:
        text: One entry of a header.

    Returns:
        The address, or None when the entry is not an IP.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1 :]
        if rest and not (rest.startswith(":") and _is_port(rest[1:])):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        host, port = text.split(":")
        if not _is_port(port):
            return None
        text = host
        try:
            return _normalise(ipaddress.IPv4Address(text))
        except ValueError:
            return None
    if not text or "%" in text or not text.isascii():
        return None
    try:
        return _normalise(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_port(text: str) -> bool:
    """Say whether ``text`` is a port number as proxies write it.

    Args:
        text: What follows the colon.

    Returns:
        True for one to five ASCII digits.
    """
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


def _normalise(address: _Address) -> _Address:
    """Turn an IPv4-mapped IPv6 address into its IPv4 address.

    Args:
        address: Any address.

    Returns:
        The IPv4 address for ``::ffff:a.b.c.d``, else ``address`` itself.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _header_values(headers: Headers, name: bytes) -> list[str]:
    """Return a header's values, decoded, in the order they came.

    Args:
        headers: The request headers.
        name: The header name, lower case.

    Returns:
        One string per header line (latin-1, so decoding never fails).
    """
    return [v.decode("latin-1") for v in headers.getRawHeaders(name, [])]


def client_ip(
    peer_host: str | None, headers: Headers, trusted: NetworkSet
) -> str | None:
    """Find the client's IP address behind any trusted reverse proxies.

    Forwarding headers are believed only when the TCP peer is in ``trusted``;
    otherwise anyone could claim any address. From a trusted peer, all
    ``X-Forwarded-For`` lines are joined in order and walked right to left
    (nearest hop first): the first address that is not itself trusted is the
    client. If every address is trusted, the left-most one is. Empty list
    elements are skipped. An entry that is not an IP makes the rest of the
    chain unusable: the walk stops and the peer is returned (no untrusted
    address has been found by then, or the walk would have ended). Without
    ``X-Forwarded-For``, a valid ``X-Real-IP`` (the last line) is used, else
    the peer.

    Args:
        peer_host: The TCP peer's address, or None when there is none (such
            as a UNIX socket).
        headers: The request headers.
        trusted: The reverse proxies whose headers are believed.

    Returns:
        The client's address in canonical form (IPv4-mapped IPv6 as IPv4),
        the peer as given when it is not an IP, or None when ``peer_host``
        is None and the headers are not believed.
    """
    if peer_host is None:
        return None
    if not trusted and _DOTTED_QUAD.fullmatch(peer_host):
        return peer_host  # the usual case, without parsing
    peer = _parse_address(peer_host)
    if peer is None:
        return peer_host
    peer_text = str(peer)
    if peer not in trusted:
        return peer_text

    entries = [
        entry
        for line in _header_values(headers, b"x-forwarded-for")
        for entry in line.split(",")
        if entry.strip()
    ]
    if entries:
        address: _Address | None = None
        for entry in reversed(entries):
            address = _parse_address(entry)
            if address is None:
                return peer_text
            if address not in trusted:
                return str(address)
        return str(address)  # every hop trusted: the left-most one

    real_ip = _header_values(headers, b"x-real-ip")
    if real_ip:
        address = _parse_address(real_ip[-1])
        if address is not None:
            return str(address)
    return peer_text
