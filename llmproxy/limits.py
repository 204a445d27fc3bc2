"""Who is calling, are they allowed in, and how often: pure request policy.

Three independent pieces, all without I/O (except :meth:`KeyStore.from_config`
reading a keys file once, at construction) and without reading the time
themselves:

* :func:`client_ip`: the client's address, believing ``X-Forwarded-For`` and
  ``X-Real-IP`` only when they come from a trusted proxy.
* :class:`RateLimiter`: per-client token buckets on an injected clock, in a
  table bounded both in size and by expiry.
* :class:`KeyStore` and :func:`presented_key`: client API keys, compared in
  constant time against stored SHA-256 digests and named by non-secret ids.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

from twisted.web.http_headers import Headers

from llmproxy.egress._noproxy import NetworkSet

# An IPv4 address in canonical form (as a socket reports a peer).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")

__all__ = [
    "KeyStore",
    "RateLimiter",
    "client_ip",
    "presented_key",
    "retry_after",
]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Clock(Protocol):
    """Anything that tells the time, such as a reactor or a ``task.Clock``."""

    def seconds(self) -> float:
        """Return the current time in seconds."""


# --------------------------------------------------------------------------
# Client IP


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


# --------------------------------------------------------------------------
# Rate limiting

#: Tolerance for float drift when counting tokens (0.1 + 0.2 != 0.3).
_EPSILON = 1e-9

#: How many of the oldest buckets each :meth:`RateLimiter.take` may expire.
_PRUNE_BATCH = 8


class _Bucket:
    """One client's token count as of a moment."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        """Record the state.

        Args:
            tokens: Tokens in the bucket at ``stamp``.
            stamp: When ``tokens`` was last brought up to date.
        """
        self.tokens = tokens
        self.stamp = stamp


def retry_after(seconds: float) -> int:
    """Turn a wait into a ``Retry-After`` value.

    Args:
        seconds: The wait, as returned by :meth:`RateLimiter.take`.

    Returns:
        Whole seconds, rounded up (ignoring float noise below a nanosecond),
        and at least 1.

    Raises:
        ValueError: If ``seconds`` is not finite.
    """
    if not math.isfinite(seconds):
        raise ValueError("retry_after needs a finite number of seconds")
    return max(1, math.ceil(seconds - _EPSILON))


class RateLimiter:
    """Per-key token buckets: ``burst`` requests at once, ``rate`` per second.

    Each key starts with a full bucket of ``burst`` tokens; a request takes
    one; the bucket refills continuously at ``rate`` tokens per second up to
    ``burst``. ``rate`` may be fractional (0.5 is one request every 2 s).

    The table is bounded. A bucket that has refilled to full behaves exactly
    like no bucket, so buckets are kept in least-recently-used order and each
    :meth:`take` drops a few of the oldest once they would be full (an idle
    key is gone at most ``burst / rate`` seconds after its last request, as
    traffic arrives; amortised O(1)). The table also never holds more than
    ``max_clients`` buckets: past that, the least recently used is evicted.
    Eviction can only favour that client (it starts again with a full
    bucket); with ``max_clients`` above the number of clients active within
    ``burst / rate`` seconds it never happens.
    """

    def __init__(
        self, rate: float, burst: int, clock: _Clock, *, max_clients: int = 100_000
    ) -> None:
        """Set the limits.

        Args:
            rate: Tokens added per second, greater than 0.
            burst: Bucket size (requests allowed at once), at least 1.
            clock: The time source (``seconds()``), such as the reactor.
            max_clients: Most buckets kept at once, at least 1.

        Raises:
            ValueError: If a limit is out of range.
        """
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError("rate must be a finite number greater than 0")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.rate = float(rate)
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """Return how many buckets are held (expired ones may linger)."""
        return len(self._buckets)

    def _full_at(self, bucket: _Bucket) -> float:
        """Return when ``bucket`` will have refilled to ``burst``.

        Args:
            bucket: A bucket of this limiter.

        Returns:
            A time on the clock.
        """
        return bucket.stamp + (self.burst - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Drop up to a batch of the least recently used buckets that are full.

        Buckets are in last-use order and each is full at most
        ``burst / rate`` after its last use, so the expired ones form (up to
        that slack) the front of the table: stop at the first live one.

        Args:
            now: The current time.
        """
        buckets = self._buckets
        for _ in range(_PRUNE_BATCH):
            if not buckets:
                return
            key = next(iter(buckets))
            if self._full_at(buckets[key]) > now:
                return
            del buckets[key]

    def take(self, key: str) -> float:
        """Try to take one token from ``key``'s bucket.

        Args:
            key: The client, such as its IP address or key id.

        Returns:
            0.0 when a token was taken (the request may go ahead), else the
            seconds until one token is available (refuse it; see
            :func:`retry_after`).
        """
        now = self._clock.seconds()
        self._prune(now)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            buckets[key] = bucket
            if len(buckets) > self.max_clients:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
            # max(): a clock that steps back must not drain the bucket.
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0 - _EPSILON:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


# --------------------------------------------------------------------------
# Client keys

_HASH_PREFIX = "sha256:"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _digest(key: str) -> bytes:
    """Hash a key as it is stored and compared.

    Args:
        key: A key (any string: lone surrogates are encoded, never refused).

    Returns:
        The SHA-256 digest of its UTF-8 bytes.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _parse_entry(entry: str) -> bytes | None:
    """Turn one configured key into its digest.

    Args:
        entry: A plain key, or ``sha256:`` and 64 hex digits.

    Returns:
        The digest, or None for a malformed ``sha256:`` entry.
    """
    if entry[: len(_HASH_PREFIX)].lower() != _HASH_PREFIX:
        return _digest(entry)
    hex_digits = entry[len(_HASH_PREFIX) :].strip()
    if len(hex_digits) != 64 or not set(hex_digits) <= _HEX_DIGITS:
        return None
    return bytes.fromhex(hex_digits)


class KeyStore:
    """The client API keys the proxy accepts, kept only as SHA-256 digests.

    An empty store accepts nothing; whether auth is required at all is the
    caller's decision (``len(store) == 0`` means no keys are configured).
    """

    def __init__(self, digests: Iterable[bytes]) -> None:
        """Store the digests.

        Args:
            digests: SHA-256 digests (32 bytes each) of the accepted keys;
                duplicates are dropped.

        Raises:
            ValueError: If a digest is not 32 bytes.
        """
        entries: dict[bytes, str] = {}
        for digest in digests:
            if len(digest) != hashlib.sha256().digest_size:
                raise ValueError("a key digest must be 32 bytes (SHA-256)")
            entries.setdefault(bytes(digest), "key-" + digest.hex()[:8])
        self._entries = tuple(entries.items())

    def __len__(self) -> int:
        """Return how many distinct keys are accepted."""
        return len(self._entries)

    def __repr__(self) -> str:
        """Describe the store without its digests."""
        return f"<KeyStore with {len(self._entries)} key(s)>"

    @classmethod
    def from_config(cls, keys: Sequence[str], keys_file: str | None) -> KeyStore:
        """Build a store from configured keys and an optional keys file.

        Both take plain keys (hashed at load) or stored hashes written as
        ``sha256:`` and 64 hex digits. In the file, one key per line; blank
        lines and lines starting with ``#`` are ignored, and surrounding
        spaces are stripped.

        Args:
            keys: Keys from the config.
            keys_file: Path of a keys file, or None.

        Returns:
            The store.

        Raises:
            ValueError: For an empty or malformed config key (naming its
                index), an unreadable or non-UTF-8 file, or a malformed
                ``sha256:`` line (naming its line number). Messages never
                contain a key.
        """
        digests: list[bytes] = []
        for index, entry in enumerate(keys):
            entry = entry.strip()
            digest = _parse_entry(entry) if entry else None
            if digest is None:
                raise ValueError(
                    f"keys[{index}]: expected a key or 'sha256:' and 64 hex digits"
                )
            digests.append(digest)
        if keys_file is not None:
            digests.extend(_read_keys_file(keys_file))
        return cls(digests)

    def check(self, presented: str | None) -> str | None:
        """Say which stored key, if any, ``presented`` is.

        The presented key is hashed and compared with every stored digest
        using :func:`hmac.compare_digest`, without stopping at a match, so
        the time taken reveals neither the key nor which one matched.

        Args:
            presented: The key the client sent, or None.

        Returns:
            A stable non-secret id (``key-`` and the first 8 hex digits of the
            key's SHA-256) for logs and rate limiting, or None when the key
            is missing or unknown.
        """
        if not presented:
            return None
        digest = _digest(presented)
        found: str | None = None
        for stored, key_id in self._entries:
            if hmac.compare_digest(stored, digest):
                found = key_id
        return found


def _read_keys_file(path: str) -> list[bytes]:
    """Read a keys file into digests.

    Args:
        path: The file's path.

    Returns:
        One digest per key line.

    Raises:
        ValueError: If the file cannot be read or a line is malformed.
    """
    problem: str | None = None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        problem = e.strerror or type(e).__name__
    if problem is not None:
        # Raised outside the except block: no chained exception to carry.
        raise ValueError(f"keys file {path!r}: cannot read it ({problem})")
    digests = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            line = None
        if line is None:
            raise ValueError(f"keys file {path!r}, line {number}: not UTF-8")
        if not line or line.startswith("#"):
            continue
        digest = _parse_entry(line)
        if digest is None:
            raise ValueError(
                f"keys file {path!r}, line {number}: malformed entry, expected"
                " 'sha256:' and 64 hex digits"
            )
        digests.append(digest)
    return digests


def presented_key(headers: Headers) -> str | None:
    """Find the API key a client sent.

    ``Authorization: Bearer <key>`` (scheme in any case) is looked at first,
    then ``x-api-key: <key>``; the first line of each header counts.

    Args:
        headers: The request headers.

    Returns:
        The key, stripped of spaces, or None when neither header has one.
    """
    for value in headers.getRawHeaders(b"authorization", [])[:1]:
        parts = value.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == b"bearer" and parts[1].strip():
            return parts[1].strip().decode("utf-8", "surrogateescape")
    for value in headers.getRawHeaders(b"x-api-key", [])[:1]:
        token = value.strip()
        if token:
            return token.decode("utf-8", "surrogateescape")
    return None
