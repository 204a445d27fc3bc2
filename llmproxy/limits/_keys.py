"""Client API keys: stored as SHA-256 digests, compared in constant time.

:class:`KeyStore` holds the accepted keys (the config's ``auth`` section:
its keys and its keys file's) and names them by non-secret ids, with their
policies (:class:`KeyInfo`); :func:`presented_key` finds the key a request
carries.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from fnmatch import fnmatchcase

import attrs
from twisted.web.http_headers import Headers

from llmproxy.config import AuthConfig, BudgetConfig, ClientKey, KeyRateConfig, key_digest

__all__ = ["KeyInfo", "KeyStore", "presented_key"]


@attrs.frozen
class KeyInfo:
    """What the proxy knows of an accepted key, without the key: its policy.

    Attributes:
        id: ``key-`` and the first 8 hex digits of the key's SHA-256.
        name: The configured name, or None.
        budget: The key's budget (tokens or usd), or None.
        models: The model names and globs the key may name, or None for
            every model.
        rate_limit: The key's own rate limit, or None for the global one.
    """

    id: str
    name: str | None = None
    budget: BudgetConfig | None = None
    models: tuple[str, ...] | None = None
    rate_limit: KeyRateConfig | None = None

    @property
    def label(self) -> str:
        """The key as metrics and logs name it: its name, else its id."""
        return self.name if self.name is not None else self.id

    def allows(self, model: str | None) -> bool:
        """Whether the key may use ``model``.

        Args:
            model: The model a request's body names, or None when the proxy
                cannot read one (no top-level ``model`` string in a JSON
                body: a form, or a key written with escapes, which the
                upstream may still read as a model).

        Returns:
            True without ``models``, or when a name or glob of ``models``
            matches (case-sensitively); False for None with ``models``.
        """
        if self.models is None:
            return True
        return model is not None and any(fnmatchcase(model, p) for p in self.models)


def _digest(key: str) -> bytes:
    """Hash a presented key as stored keys are hashed.

    Args:
        key: A key (any string: lone surrogates are encoded, never refused).

    Returns:
        The SHA-256 digest of its UTF-8 bytes.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyStore:
    """The client API keys the proxy accepts, kept only as SHA-256 digests.

    An empty store accepts nothing; whether auth is required at all is the
    caller's decision (``len(store) == 0`` means no keys are configured).
    """

    def __init__(self, digests: Iterable[bytes | tuple[bytes, ClientKey | None]]) -> None:
        """Store the digests.

        Args:
            digests: SHA-256 digests (32 bytes each) of the accepted keys,
                or ``(digest, entry)`` where the config's entry gives the
                key's name and policy (its ``key`` is not read);
                duplicates are dropped (the first wins).

        Raises:
            ValueError: If a digest is not 32 bytes.
        """
        entries: dict[bytes, KeyInfo] = {}
        for item in digests:
            digest, entry = item if isinstance(item, tuple) else (item, None)
            if len(digest) != hashlib.sha256().digest_size:
                raise ValueError("a key digest must be 32 bytes (SHA-256)")
            key_id = "key-" + digest.hex()[:8]
            if entry is None:
                info = KeyInfo(key_id)
            else:
                info = KeyInfo(key_id, entry.name, entry.budget, entry.models, entry.rate_limit)
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
    def from_config(cls, auth: AuthConfig) -> KeyStore:
        """Build a store from the ``auth`` section (no file is read here).

        Keys are plain (hashed now) or stored hashes written as ``sha256:``
        and 64 hex digits, from ``auth.keys`` and then from the keys file's
        entries, which the config read when it was loaded.

        Args:
            auth: The validated ``auth`` section.

        Returns:
            The store.

        Raises:
            ValueError: For an empty or malformed key (naming where it is,
                never what it is) or a name used twice: mistakes the config
                refuses, so only in an ``AuthConfig`` made by hand.
        """
        digests: list[tuple[bytes, ClientKey | None]] = []
        for where, entries in (("keys", auth.keys), ("file_keys", auth.file_keys)):
            for index, entry in enumerate(entries):
                digest = key_digest(entry.key)
                if digest is None:
                    raise ValueError(
                        f"{where}[{index}]: expected a key or 'sha256:' and 64 hex digits"
                    )
                digests.append((digest, entry))
        names = [entry.name for _, entry in digests if entry is not None and entry.name]
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
            name and policy; None when the key is missing or unknown.
        """
        if not presented:
            return None
        digest = _digest(presented)
        found: KeyInfo | None = None
        for stored, info in self._entries:
            if hmac.compare_digest(stored, digest):
                found = info
        return found


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
