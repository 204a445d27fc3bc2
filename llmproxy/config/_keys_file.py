"""The keys file ``auth.keys_file`` names: one client key a line.

A line is a key (or ``sha256:`` and the 64 hex digits of one), then
optional fields separated by spaces: ``name=NAME``, ``budget=TOKENS/PER``
or ``budget=$USD/PER``, ``reserve=N``, ``models=NAME,GLOB*`` and
``rate=RATE`` or ``rate=RATE/BURST``. Blank lines and lines starting with
``#`` are skipped.

The file is read once, when the config is loaded, so that ``--check``
reports its mistakes like any other. A mistake names the file and the line,
never the key nor anything after it on that line.
"""

from __future__ import annotations

import hashlib

from llmproxy.config._key_fields import (
    line_budget,
    models_text,
    name_problem,
    rate_text,
    reserve_text,
)
from llmproxy.config._model import ConfigError
from llmproxy.config._policy import BudgetConfig, ClientKey, KeyRateConfig

__all__ = ["KEYS_FILE", "key_digest", "parse_key_line", "read_keys_file"]

#: Where every keys file mistake is reported.
KEYS_FILE = "auth.keys_file"

_HASH_PREFIX = "sha256:"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

_FIELDS = ("name", "budget", "reserve", "models", "rate")
_FIELDS_FORM = (
    "after the key, expected name=NAME, budget=TOKENS/PER or $USD/PER, reserve=N, "
    "models=NAME,GLOB* and rate=RATE[/BURST], each at most once"
)


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


def parse_key_line(line: str, origin: str = "") -> ClientKey:
    """One keys file line: a key and its policy's fields.

    Args:
        line: The line, without its line break (spaces around it are
            ignored).
        origin: Where the line is, kept in the key for messages.

    Returns:
        The key with its name, budget, models and rate limit.

    Raises:
        ValueError: The line is malformed; the message is worded without
            any of the line's text.
    """
    key, *fields = line.split()
    if key_digest(key) is None:
        raise ValueError("malformed entry, expected 'sha256:' and 64 hex digits")
    values: dict[str, str] = {}
    for field in fields:
        label, equals, value = field.partition("=")
        if not equals or label not in _FIELDS or label in values:
            raise ValueError(_FIELDS_FORM)
        values[label] = value
    name = values.get("name")
    if name is not None and (problem := name_problem(name)) is not None:
        raise ValueError(problem)
    reserve = None
    if "reserve" in values:
        reserve = reserve_text(values["reserve"])
        if reserve is None:
            raise ValueError("reserve: expected a whole number of tokens, at least 1")
        if "budget" not in values:
            raise ValueError("reserve=N goes with a budget=")
    limit = None
    if "budget" in values:
        parsed = line_budget(values["budget"], reserve)
        if not isinstance(parsed, BudgetConfig):
            raise ValueError(parsed)
        if name is None:
            raise ValueError("a key with a budget needs a name")
        limit = parsed
    models = None
    if "models" in values:
        models = models_text(values["models"])
        if models is None:
            raise ValueError(
                "models: expected model names or globs separated by commas, without spaces"
            )
    rate = None
    if "rate" in values:
        parsed_rate = rate_text(values["rate"])
        if not isinstance(parsed_rate, KeyRateConfig):
            raise ValueError(parsed_rate)
        rate = parsed_rate
    return ClientKey(key=key, name=name, budget=limit, models=models, rate_limit=rate,
                     origin=origin)


def read_keys_file(path: str, names: set[str]) -> tuple[ClientKey, ...]:
    """Read a keys file.

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
        entry: ClientKey | None = None
        try:
            entry = parse_key_line(line, where)
        except ValueError as e:
            problem = str(e)
        if entry is not None and entry.name is not None:
            if entry.name in names:
                problem = "its name=NAME is used by another key"
            names.add(entry.name)
        if problem is not None or entry is None:
            # Raised outside the except block: no chained exception to carry.
            raise ConfigError(KEYS_FILE, f"{where}: {problem}")
        keys.append(entry)
    return tuple(keys)
