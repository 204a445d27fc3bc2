"""Every mistake of a config, found in one reading.

While :func:`collecting`, a converter's mistake is noted by :func:`report`
(or :func:`checked`) and the reading goes on with that key taken as absent;
mistakes that only follow from one noted already are dropped. Outside it,
:func:`report` raises, as a converter called alone does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from llmproxy.config._model import ConfigError

__all__ = ["checked", "collecting", "report"]

T = TypeVar("T")


class _Problems(list):  # type: ignore[type-arg]
    """The mistakes found so far, and the key paths whose mistakes would
    only follow from them (the key an unknown key was probably meant as)."""

    def __init__(self) -> None:
        super().__init__()
        self.covered: set[str] = set()


# The mistakes found so far while a whole config is read (None: raise the
# first one found, as a converter called alone does).
_PROBLEMS: ContextVar[_Problems | None] = ContextVar("llmproxy_config_problems", default=None)


@contextmanager
def collecting() -> Iterator[list[ConfigError]]:
    """Read a config finding every mistake: :func:`report` and
    :func:`checked` note them in the list this yields, and go on."""
    problems = _Problems()
    token = _PROBLEMS.set(problems)
    try:
        yield problems
    finally:
        _PROBLEMS.reset(token)


def _follows(key: str, earlier: str) -> bool:
    """Whether a mistake at ``key`` only follows from one at ``earlier``
    (the same key, or one of its parents: a key found wrong counts as
    absent from then on)."""
    return earlier == key or earlier.startswith((key + ".", key + "["))


def report(error: ConfigError, meant: str | None = None) -> None:
    """Note a mistake and go on while :func:`collecting`; else raise it.

    A mistake that follows from one noted already is dropped.

    Args:
        error: The mistake.
        meant: The key path the mistaken key was probably meant as (an
            unknown key's nearest known one): its own mistakes (it is
            missing, say) follow from this one.
    """
    problems = _PROBLEMS.get()
    if problems is None:
        raise error
    if error.key in problems.covered:
        return
    if not any(_follows(error.key, seen.key) for seen in problems):
        problems.append(error)
    if meant is not None:
        problems.covered.add(meant)


def checked(read: Callable[..., T], *args: Any) -> T | None:
    """``read(*args)`` (a converter's ``value, path``, say), or None once
    its mistake is reported."""
    try:
        return read(*args)
    except ConfigError as e:
        report(e)
        return None
