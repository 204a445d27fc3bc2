"""Client keys: the ``auth`` section.

Its ``keys`` entries and its keys file's lines give
:class:`~llmproxy.config.ClientKey` entries: a key (plain, or ``sha256:``
and the digest of one), with an optional name, budget, models and rate
limit. The keys file is read by ``_keys_file`` when the config is loaded;
the policy's fields are read by ``_key_fields``.
"""

from __future__ import annotations

from typing import Any

from llmproxy.config._key_fields import budget, key_name, key_rate, models
from llmproxy.config._keys_file import key_digest, read_keys_file
from llmproxy.config._model import ConfigError
from llmproxy.config._policy import AuthConfig, ClientKey
from llmproxy.config._problems import checked
from llmproxy.config._values import _describe, _join, _Mapping, _string

__all__ = ["auth_section"]

_KEY_FORM = "expected a key or 'sha256:' and 64 hex digits"
_CLIENT_KEY_FIELDS = ("key", "key_sha256", "name", "budget", "models", "rate_limit")


def _client_key(value: Any, path: str) -> ClientKey:
    """One entry of ``auth.keys``: a key, or a mapping with its policy."""
    if isinstance(value, str):
        return ClientKey(key=_key(value, path), origin=path)
    if not isinstance(value, dict):
        raise ConfigError(
            path, f"expected a key (a string) or a mapping with 'key', got {_describe(value, path)}"
        )
    table = _Mapping(value, path)
    table.check_keys(_CLIENT_KEY_FIELDS)
    key = table.get("key", _key)
    hashed = table.get("key_sha256", _key_sha256)
    if key is not None and hashed is not None:
        raise ConfigError(_join(path, "key_sha256"), "give key or key_sha256, not both")
    if table.value.get("key") is None and table.value.get("key_sha256") is None:
        raise ConfigError(
            _join(path, "key"), "required: the key (use ${ENV}), or key_sha256 (its SHA-256)"
        )
    name = table.get("name", key_name)
    limit = table.get("budget", budget)
    if limit is not None and name is None:
        raise ConfigError(_join(path, "name"), "a key with a budget needs a name")
    return ClientKey(
        key=key if key is not None else hashed or "",
        name=name,
        budget=limit,
        models=table.get("models", models),
        rate_limit=table.get("rate_limit", key_rate),
        origin=path,
    )


def _key(value: Any, path: str) -> str:
    """A key as written in the config: plain, or a well-formed ``sha256:``."""
    key = _string(value, path)
    if key_digest(key) is None:
        raise ConfigError(path, _KEY_FORM)
    return key


def _key_sha256(value: Any, path: str) -> str:
    """``key_sha256``: 64 hex digits (``sha256:`` before them allowed).

    Returns:
        The entry as a key is written for a stored hash: ``sha256:<hex>``.
    """
    text = _string(value, path).strip()
    if text[:7].lower() == "sha256:":
        text = text[7:].strip()
    entry = "sha256:" + text
    if key_digest(entry) is None:
        raise ConfigError(path, "expected 64 hex digits: the SHA-256 of the key")
    return entry


def auth_section(value: Any, path: str) -> AuthConfig:
    """The ``auth`` section, with the entries of its keys file (read now).

    Args:
        value: The YAML value.
        path: Its key path (``auth``).

    Returns:
        The section.

    Raises:
        ConfigError: Naming the entry, field or keys file line that is
            wrong (never quoting a key).
    """
    table = _Mapping(value, path)
    table.check_keys(("keys", "keys_file"))
    listed = table.value.get("keys")
    if listed is not None and not isinstance(listed, list):
        keys_path = _join(path, "keys")
        raise ConfigError(keys_path, f"expected a list, got {_describe(listed, keys_path)}")
    entries = [
        (i, checked(_client_key, item, f"{_join(path, 'keys')}[{i}]"))
        for i, item in enumerate(listed or ())
    ]
    keys = tuple(k for _, k in entries if k is not None)
    seen: set[str] = set()
    for i, k in entries:
        if k is not None and k.name is not None:
            if k.name in seen:
                raise ConfigError(f"{_join(path, 'keys')}[{i}].name", f"{k.name!r} is used twice")
            seen.add(k.name)
    keys_file = table.get("keys_file", _string)
    file_keys = read_keys_file(keys_file, seen) if keys_file is not None else ()
    if not keys and keys_file is None:
        raise ConfigError(path, "give 'keys' or 'keys_file' (or remove 'auth')")
    return AuthConfig(keys=keys, keys_file=keys_file, file_keys=file_keys)
