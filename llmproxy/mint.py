"""``llmproxy-mint-key``: make a client key and the config lines that hold its hash.

The key is printed once, for the client. The keys file line and the
``auth.keys`` entry printed with it hold only the key's SHA-256, so the
config that accepts the key never holds it. The policy options (``--name``,
``--budget``, ``--reserve``, ``--models``, ``--rate``) are checked as the
config checks a keys file line.

Run it as ``llmproxy-mint-key`` or ``python -m llmproxy.mint``.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import yaml

from llmproxy.config import DEFAULT_RESERVE, ClientKey, parse_key_line

__all__ = ["KEY_PREFIX", "main", "mint_key", "yaml_entry"]

#: What every minted key starts with, so that one is recognised in a leak.
KEY_PREFIX = "llmp-"

#: Random bytes in a minted key (43 URL-safe characters).
KEY_BYTES = 32

_PROG = "llmproxy-mint-key"

#: Option -> the keys file field it becomes.
_FIELDS = {"name": "name", "budget": "budget", "reserve": "reserve", "models": "models",
           "rate": "rate"}


def mint_key() -> str:
    """A new random client key: :data:`KEY_PREFIX` and 43 URL-safe characters."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def yaml_entry(digest: str, entry: ClientKey) -> str:
    """The ``auth.keys`` entry for a key's hash and policy, on one line.

    Args:
        digest: The key's SHA-256, 64 hex digits.
        entry: The key's policy (its ``key`` is not read).

    Returns:
        ``- {key_sha256: <hex>, name: NAME, ...}``.
    """
    fields: dict[str, Any] = {"key_sha256": digest}
    if entry.name is not None:
        fields["name"] = entry.name
    budget = entry.budget
    if budget is not None:
        amount = {"tokens": budget.tokens} if budget.usd is None else {"usd": budget.usd}
        fields["budget"] = {**amount, "per": budget.per}
        if budget.reserve != DEFAULT_RESERVE:
            fields["budget"]["reserve"] = budget.reserve
    if entry.models is not None:
        fields["models"] = list(entry.models)
    if entry.rate_limit is not None:
        fields["rate_limit"] = {"rate": entry.rate_limit.rate, "burst": entry.rate_limit.burst}
    text = yaml.safe_dump(fields, default_flow_style=True, sort_keys=False, width=10**6)
    return "- " + text.strip()


def _parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Make a client key; print it once, and the keys file line and the "
        "auth.keys entry that hold only its SHA-256.",
    )
    parser.add_argument("--name", help="the key's name in logs, metrics and /budgets")
    parser.add_argument("--budget", help="TOKENS/PER (2000000/day) or $USD/PER ($25/month); "
                        "needs --name")
    parser.add_argument("--reserve", help="output tokens held for a request naming no "
                        f"output cap (default {DEFAULT_RESERVE}); needs --budget")
    parser.add_argument("--models", help="model names or globs the key may name, "
                        "comma-separated (gpt-4o*,text-embedding-*)")
    parser.add_argument("--rate", help="the key's own rate limit: RATE or RATE/BURST "
                        "(requests per second, at once)")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Mint a key and print it with its config lines.

    Args:
        argv: The arguments (default: the command line's).
        out: Where the key and the lines go (default stdout).
        err: Where a mistake is told (default stderr).

    Returns:
        0, or 2 for a mistake in the options (nothing is minted then).
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    options = _parser().parse_args(argv)
    fields = []
    for option, field in _FIELDS.items():
        value = getattr(options, option)
        if value is None:
            continue
        if not value or any(c.isspace() for c in value):
            err.write(f"{_PROG}: --{option}: expected a value without spaces\n")
            return 2
        fields.append(f"{field}={value}")
    key = mint_key()
    digest = hashlib.sha256(key.encode("ascii")).hexdigest()
    line = " ".join([f"sha256:{digest}", *fields])
    try:
        entry = parse_key_line(line)
    except ValueError as e:
        problem = str(e)
        if problem.split(":")[0].split(".")[0] in _FIELDS:
            problem = "--" + problem
        err.write(f"{_PROG}: {problem}\n")
        return 2
    out.write(
        f"key (shown once; give it to the client): {key}\n"
        f"its id in logs: key-{digest[:8]}\n"
        "keys file line:\n"
        f"{line}\n"
        "auth.keys entry:\n"
        f"{yaml_entry(digest, entry)}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
