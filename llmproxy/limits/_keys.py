"""Client API keys: stored as SHA-256 digests, compared in constant time.

:class:`KeyStore` holds the accepted keys (from the config and an optional
keys file) and names them by non-secret ids; :func:`presented_key` finds the
key a request carries.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from twisted.web.http_headers import Headers

from llmproxy.config import BudgetConfig, ClientKey, ConfigError

__all__ = ["KeyInfo", "KeyStore", "presented_key"]


@attrs.frozen
class KeyInfo:
    """What the proxy knows of an accepted key, without the key.

    Attributes:
        id: ``key-`` and the first 8 hex digits of the key's SHA-256.
        name: The configured name, or None.
        budget: The key's token budget, or None.
    """

    id: str
    name: str | None = None
    budget: BudgetConfig | None = None

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

    def __init__(self, digests: Iterable[bytes | tuple[bytes, str | None, Any]]) -> None:
        """Store the digests.

        Args:
            digests: SHA-256 digests (32 bytes each) of the accepted keys,
                or ``(digest, name, budget)``; duplicates are dropped (the
                first wins).

        Raises:
            ValueError: If a digest is not 32 bytes.
        """
        entries: dict[bytes, KeyInfo] = {}
        for item in digests:
            digest, name, limit = item if isinstance(item, tuple) else (item, None, None)
            if len(digest) != hashlib.sha256().digest_size:
                raise ValueError("a key digest must be 32 bytes (SHA-256)")
            info = KeyInfo("key-" + digest.hex()[:8], name, limit)
            entries.setdefault(bytes(digest), info)
        self._entries = tuple(entries.items())

    def named(self) -> list[KeyInfo]:
        """The keys that have a name, in configuration order."""
        return [info for _, info in self._entries if info.name is not None]

    def __len__(self) -> int:
        """Return how many distinct keys are accepted."""
        return len(self._entries)

    def __repr__(self) -> str:
        """Describe the store without its digests."""
        return f"<KeyStore with {len(self._entries)} key(s)>"

    @classmethod
    def from_config(
        cls, keys: Sequence[str | ClientKey], keys_file: str | None
    ) -> KeyStore:
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
        digests: list[tuple[bytes, str | None, Any]] = []
        for index, entry in enumerate(keys):
            if isinstance(entry, str):
                entry = ClientKey(key=entry)
            text = entry.key.strip()
            digest = _parse_entry(text) if text else None
            if digest is None:
                raise ValueError(
                    f"keys[{index}]: expected a key or 'sha256:' and 64 hex digits"
                )
            digests.append((digest, entry.name, entry.budget))
        if keys_file is not None:
            digests.extend(_read_keys_file(keys_file))
        names = [name for _, name, _ in digests if name is not None]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"key name {name!r} is used twice")
        return cls(digests)

    def check(self, presented: str | None) -> str | None:
        """The id of the stored key ``presented`` is, if any (see
        :meth:`lookup`)."""
        info = self.lookup(presented)
        return info.id if info is not None else None

    def lookup(self, presented: str | None) -> KeyInfo | None:
        """Say which stored key, if any, ``presented`` is.

        The presented key is hashed and compared with every stored digest
        using :func:`hmac.compare_digest`, without stopping at a match, so
        the time taken reveals neither the key nor which one matched.

        Args:
            presented: The key the client sent, or None.

        Returns:
            The key's info: a stable non-secret id (``key-`` and the first 8
            hex digits of the key's SHA-256) for logs and rate limiting, its
            name and budget; None when the key is missing or unknown.
        """
        if not presented:
            return None
        digest = _digest(presented)
        found: KeyInfo | None = None
        for stored, info in self._entries:
            if hmac.compare_digest(stored, digest):
                found = info
        return found


def _read_keys_file(path: str) -> list[tuple[bytes, str | None, Any]]:
    """Read a keys file into digests with their names and budgets.

    A line is a key (or ``sha256:`` and its digest), optionally followed by
    ``name=NAME`` and ``budget=TOKENS/PER``, separated by spaces.

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
        key, *fields = line.split()
        digest = _parse_entry(key)
        if digest is None:
            raise ValueError(
                f"keys file {path!r}, line {number}: malformed entry, expected"
                " 'sha256:' and 64 hex digits"
            )
        digests.append((digest, *_key_fields(fields, f"keys file {path!r}, line {number}")))
    return digests


def _key_fields(fields: list[str], where: str) -> tuple[str | None, BudgetConfig | None]:
    """``name=`` and ``budget=`` after a key on a keys file line."""
    from llmproxy.config._sections import budget, key_name

    values: dict[str, str] = {}
    for field in fields:
        name, equals, value = field.partition("=")
        if not equals or name not in ("name", "budget") or name in values:
            raise ValueError(
                f"{where}: after the key, expected name=NAME and budget=TOKENS/PER, "
                f"got {field[:40]!r}"
            )
        values[name] = value
    try:
        key = key_name(values["name"], "name") if "name" in values else None
        limit = budget(values["budget"], "budget") if "budget" in values else None
    except ConfigError as e:
        raise ValueError(f"{where}: {e}") from None
    if limit is not None and key is None:
        raise ValueError(f"{where}: a key with a budget needs a name")
    return key, limit


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
