"""Client keys: the ``auth`` section and the keys file it may name.

Both give :class:`~llmproxy.config.ClientKey` entries: a key (plain, or
``sha256:`` and the digest of one), with an optional name and budget. The
keys file is read here, once, when the config is loaded, so that ``--check``
reports its mistakes like any other; a mistake names the file and the line,
never the key nor anything after it on that line.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from llmproxy.config._model import (
    BUDGET_PERIODS,
    AuthConfig,
    BudgetConfig,
    ClientKey,
    ConfigError,
)
from llmproxy.config._values import _describe, _join, _Mapping, _positive_int, _string

__all__ = ["budget", "key_digest", "key_name"]

#: Where every keys file mistake is reported.
KEYS_FILE = "auth.keys_file"

_HASH_PREFIX = "sha256:"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

_KEY_FORM = "expected a key or 'sha256:' and 64 hex digits"
_NAME_RULE = (
    "a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
)
_BUDGET_FORM = "expected TOKENS/PER such as 2000000/day"
_PERIODS = f"expected one of {', '.join(BUDGET_PERIODS)}"


def key_digest(entry: str) -> bytes | None:
    """The SHA-256 digest a configured key stands for.

    Args:
        entry: A plain key, or ``sha256:`` (any case) and 64 hex digits;
            surrounding spaces are ignored.

    Returns:
        The digest of a plain key's UTF-8 bytes (lone surrogates encoded,
        never refused), or the digest written after ``sha256:``; None for
        an empty entry or a malformed ``sha256:`` one.
    """
    text = entry.strip()
    if not text:
        return None
    if text[: len(_HASH_PREFIX)].lower() != _HASH_PREFIX:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    hex_digits = text[len(_HASH_PREFIX) :].strip()
    if len(hex_digits) != 64 or not set(hex_digits) <= _HEX_DIGITS:
        return None
    return bytes.fromhex(hex_digits)


def key_name(value: Any, path: str) -> str:
    """A client key's name: 1-64 letters, digits, ``.``, ``_``, ``-``.

    Names appear in logs, metric labels and store keys, so nothing else is
    allowed (no spaces, quotes or control characters).

    Args:
        value: The YAML value.
        path: Its key path.

    Returns:
        The name.

    Raises:
        ConfigError: Not such a name.
    """
    name = _string(value, path)
    if not _NAME.match(name):
        raise ConfigError(path, f"{_NAME_RULE}; got {name[:70]!r}")
    return name


def budget(value: Any, path: str) -> BudgetConfig:
    """``{tokens: N, per: minute|hour|day|month}``, or the text ``N/per``.

    Args:
        value: The YAML value.
        path: Its key path.

    Returns:
        The budget.

    Raises:
        ConfigError: Naming the part that is wrong.
    """
    if isinstance(value, str):
        parsed = _budget_text(value)
        if parsed is None:
            raise ConfigError(path, f"{_BUDGET_FORM}, got {value!r}")
        value = {"tokens": parsed[0], "per": parsed[1]}
    table = _Mapping(value, path)
    table.check_keys(("tokens", "per"))
    tokens = table.get("tokens", _positive_int)
    if tokens is None:
        raise ConfigError(_join(path, "tokens"), "required: tokens per window")
    per = table.get("per", _string)
    if per not in BUDGET_PERIODS:
        raise ConfigError(_join(path, "per"), f"{_PERIODS}, got {per!r}")
    return BudgetConfig(tokens=tokens, per=per)


def _budget_text(text: str) -> tuple[int, str] | None:
    """``TOKENS/PER`` split, or None when it is not of that form."""
    tokens_text, slash, per = text.partition("/")
    if not slash or not tokens_text.strip().isdigit():
        return None
    return int(tokens_text), per.strip()


def _client_key(value: Any, path: str) -> ClientKey:
    """One entry of ``auth.keys``: a key, or ``{key, name, budget}``."""
    if isinstance(value, str):
        return ClientKey(key=_key(value, path))
    if not isinstance(value, dict):
        raise ConfigError(
            path, f"expected a key (a string) or a mapping with 'key', got {_describe(value, path)}"
        )
    table = _Mapping(value, path)
    table.check_keys(("key", "name", "budget"))
    key = table.get("key", _key)
    if key is None:
        raise ConfigError(_join(path, "key"), "required: the key (use ${ENV})")
    name = table.get("name", key_name)
    limit = table.get("budget", budget)
    if limit is not None and name is None:
        raise ConfigError(_join(path, "name"), "a key with a budget needs a name")
    return ClientKey(key=key, name=name, budget=limit)


def _key(value: Any, path: str) -> str:
    """A key as written in the config: plain, or a well-formed ``sha256:``."""
    key = _string(value, path)
    if key_digest(key) is None:
        raise ConfigError(path, _KEY_FORM)
    return key


def _auth(value: Any, path: str) -> AuthConfig:
    """The ``auth`` section, with the entries of its keys file (read now)."""
    table = _Mapping(value, path)
    table.check_keys(("keys", "keys_file"))
    listed = table.value.get("keys")
    if listed is not None and not isinstance(listed, list):
        keys_path = _join(path, "keys")
        raise ConfigError(keys_path, f"expected a list, got {_describe(listed, keys_path)}")
    keys = tuple(
        _client_key(item, f"{_join(path, 'keys')}[{i}]") for i, item in enumerate(listed or ())
    )
    seen: set[str] = set()
    for i, k in enumerate(keys):
        if k.name is not None:
            if k.name in seen:
                raise ConfigError(f"{_join(path, 'keys')}[{i}].name", f"{k.name!r} is used twice")
            seen.add(k.name)
    keys_file = table.get("keys_file", _string)
    file_keys = _read_keys_file(keys_file, seen) if keys_file is not None else ()
    if not keys and keys_file is None:
        raise ConfigError(path, "give 'keys' or 'keys_file' (or remove 'auth')")
    return AuthConfig(keys=keys, keys_file=keys_file, file_keys=file_keys)


def _read_keys_file(path: str, names: set[str]) -> tuple[ClientKey, ...]:
    """Read a keys file: one key a line, then ``name=NAME`` and ``budget=T/PER``.

    Blank lines and lines starting with ``#`` are skipped; spaces around a
    line are stripped.

    Args:
        path: The file.
        names: The names already taken (by ``auth.keys``); the file's are
            added.

    Returns:
        The file's keys, in file order.

    Raises:
        ConfigError: For ``auth.keys_file``: the file cannot be read, or a
            line is not UTF-8 or is malformed (naming its number).
    """
    problem: str | None = None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        problem = e.strerror or type(e).__name__
    if problem is not None:
        # Raised outside the except block: no chained exception to carry.
        raise ConfigError(KEYS_FILE, f"cannot read {path!r}: {problem}")
    keys = []
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"keys file {path!r}, line {number}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            line = None
        if line is None:
            raise ConfigError(KEYS_FILE, f"{where}: not UTF-8")
        if not line or line.startswith("#"):
            continue
        key, *fields = line.split()
        if key_digest(key) is None:
            raise ConfigError(
                KEYS_FILE, f"{where}: malformed entry, expected 'sha256:' and 64 hex digits"
            )
        problem, name, limit = _line_fields(fields)
        if problem is None and name is not None:
            if name in names:
                problem = "its name=NAME is used by another key"
            names.add(name)
        if problem is not None:
            raise ConfigError(KEYS_FILE, f"{where}: {problem}")
        keys.append(ClientKey(key=key, name=name, budget=limit))
    return tuple(keys)


def _line_fields(fields: list[str]) -> tuple[str | None, str | None, BudgetConfig | None]:
    """``name=`` and ``budget=`` after a key on a keys file line.

    Args:
        fields: The line's words after the key.

    Returns:
        ``(problem, name, budget)``: what is wrong, worded without any of
        the line's text (a key split by a space would show), or None; and
        the name and budget given, if any.
    """
    values: dict[str, str] = {}
    for field in fields:
        label, equals, value = field.partition("=")
        if not equals or label not in ("name", "budget") or label in values:
            return "after the key, expected name=NAME and budget=TOKENS/PER", None, None
        values[label] = value
    name = values.get("name")
    if name is not None and not _NAME.match(name):
        return f"name: {_NAME_RULE}", None, None
    limit = None
    if "budget" in values:
        parsed = _budget_text(values["budget"])
        if parsed is None:
            return f"budget: {_BUDGET_FORM}", None, None
        tokens, per = parsed
        if tokens < 1:
            return "budget.tokens: must be at least 1", None, None
        if per not in BUDGET_PERIODS:
            return f"budget.per: {_PERIODS}", None, None
        if name is None:
            return "a key with a budget needs a name", None, None
        limit = BudgetConfig(tokens=tokens, per=per)
    return None, name, limit
