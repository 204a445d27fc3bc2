"""Level filtering and the readable console observer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatTime,
    textFileLogObserver,
)
from zope.interface import implementer

from llmproxy.logs._lines import ACCESS_NAMESPACE

#: The level names accepted by :func:`level_filtered`, lowest first.
LEVELS = ("debug", "info", "warn", "error", "critical")


def parse_level(level: str) -> LogLevel:
    """The LogLevel named ``level``.

    Args:
        level: One of :data:`LEVELS`.

    Returns:
        The level constant.

    Raises:
        ValueError: ``level`` is not one of :data:`LEVELS`.
    """
    if level not in LEVELS:
        raise ValueError(
            f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}"
        )
    return LogLevel.levelWithName(level)


def level_filtered(observer: ILogObserver, level: str) -> ILogObserver:
    """Wrap ``observer`` so that it only sees events at ``level`` or above.

    Events without a level are dropped (twisted.logger's rule).

    Args:
        observer: The observer to wrap.
        level: One of :data:`LEVELS`.

    Returns:
        The filtering observer.

    Raises:
        ValueError: ``level`` is not one of :data:`LEVELS`.
    """
    return _LevelFilter(observer, parse_level(level))


@implementer(ILogObserver)
class _LevelFilter:
    """Passes on events at a level or above (cheaper than a predicate chain).

    twisted.logger's LogLevelFilterPredicate looks the level up per
    namespace for every event; llmproxy has one level for everything.
    """

    def __init__(self, observer: ILogObserver, minimum: LogLevel) -> None:
        self._observer = observer
        order = list(LogLevel.iterconstants())
        self._allowed = frozenset(order[order.index(minimum):])

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") in self._allowed:
            self._observer(event)


def console_observer(
    level: str = "info", stream: IO[str] | None = None, access: bool = True
) -> ILogObserver:
    """Readable one-line-per-event text output, filtered by level.

    Args:
        level: One of :data:`LEVELS`.
        stream: Where to write; standard output by default.
        access: Whether access records are printed too.

    Returns:
        The observer.

    Raises:
        ValueError: ``level`` is not one of :data:`LEVELS`.
    """
    return level_filtered(_Console(stream or sys.stdout, access), level)


@implementer(ILogObserver)
class _Console:
    """Twisted's classic text lines, with a fast path for access records."""

    def __init__(self, stream: IO[str], access: bool = True) -> None:
        self._stream = stream
        self._access = access
        self._text = textFileLogObserver(stream)
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: float) -> str:
        """formatTime(when), which has one-second resolution, cached."""
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(second)
        return self._stamp

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == ACCESS_NAMESPACE:
            if not self._access:
                return
            try:
                text = event["log_format"].format(**event)
                line = f"{self._time(event['log_time'])} [{ACCESS_NAMESPACE}#info] {text}\n"
            except Exception:  # noqa: BLE001 - anything odd takes the slow path
                self._text(event)
                return
            self._stream.write(line)
            self._stream.flush()
            return
        self._text(event)


def console_observer_factory(level: str) -> Callable[[], ILogObserver]:
    """A zero-argument callable making a console observer, as twistd wants.

    Args:
        level: One of :data:`LEVELS`, checked now.

    Returns:
        A callable returning ``console_observer(level)``.

    Raises:
        ValueError: ``level`` is not one of :data:`LEVELS`.
    """
    parse_level(level)

    def make() -> ILogObserver:
        """A console observer at the chosen level, on standard output."""
        return console_observer(level)

    return make
