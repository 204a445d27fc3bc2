"""Which key paths hold secrets, so that no message ever shows their values.

A message about a value goes through :func:`~llmproxy.config._values._shown`
or :func:`~llmproxy.config._values._describe`, which ask :func:`is_secret`
about the value's key path and put :data:`HIDDEN` in place of a secret. The
secrets are a route's ``api_key``, the client keys (``auth``, ``auth.keys``,
each entry of it and its ``key`` or ``key_sha256``), and the whole of
``proxy_url`` and ``rate_limit.store`` (URLs that may carry a password).
Keys files are read by ``_keys``, whose messages never quote a line.

Mapping keys can be secrets too: a client key written as ``- sk-...: team``
is a mapping whose key is the secret. :func:`shows_key` says which keys of
a mapping a message (or a key path) may name.
"""

from __future__ import annotations

import re

__all__ = ["HIDDEN", "HIDDEN_KEY", "is_secret", "shows_key"]

#: What a message says in place of a secret value.
HIDDEN = "(value hidden: it is a secret)"

#: What a message says in place of a mapping key that may be a secret.
HIDDEN_KEY = "(name hidden: it may be a secret)"

#: A route's key path: ``target_map.NAME`` or ``model_routes["quoted name"]``.
_ROUTE = r'(?:target_map|model_routes)(?:\.[A-Za-z0-9_-]+|\[".*"\])'

_SECRET = re.compile(
    rf"(?:{_ROUTE}\.api_key"
    r"|auth(?:\.keys(?:\[\d+\](?:\.key|\.key_sha256)?)?)?"
    r"|proxy_url"
    r"|rate_limit\.store)\Z",
    re.S,
)

#: The keys the mappings at secret paths have (``auth`` and a client key).
_FIELDS = frozenset({"keys", "keys_file", "key", "key_sha256", "name", "budget"})

#: A key that looks like a field name (a misspelt one, say): lower-case
#: letters and ``_``, as no generated secret is.
_WORD = re.compile(r"[a-z][a-z_]{0,23}\Z")


def is_secret(path: str) -> bool:
    """Whether the value at a key path is a secret, never to be shown.

    Args:
        path: A key path, as :func:`~llmproxy.config._values._join` builds
            it (``model_routes.gpt-4.api_key``, ``auth.keys[2].key``).

    Returns:
        True for a route's ``api_key``; ``auth``, ``auth.keys``, each entry
        of it and the entry's ``key`` and ``key_sha256``; ``proxy_url`` and
        ``rate_limit.store``.
    """
    return _SECRET.match(path) is not None


def shows_key(path: str, key: str) -> bool:
    """Whether a message may name a key of the mapping at a key path.

    Args:
        path: The mapping's key path.
        key: One of its keys.

    Returns:
        False for a key of a mapping at a secret path (``auth``, an entry
        of ``auth.keys``) that is neither one such mappings have nor looks
        like a field name (at most 24 lower-case letters and ``_``): one
        written there by mistake (``- sk-...: team``) may be a secret.
    """
    return key in _FIELDS or not is_secret(path) or _WORD.match(key) is not None
