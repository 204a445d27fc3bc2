"""Level filtering and the readable console observer.

The console observer writes one line per event, with control characters
and text the stream cannot encode escaped (see :class:`Escaper`), so that
client text in a field never forges or hides a line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, formatTime
from zope.interface import implementer

from llmproxy.logs._escape import Escaper
from llmproxy.logs._lines import ACCESS_NAMESPACE, safe_repr

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


#: Twisted's factories log these at info level each time one starts or
#: stops: for the Agent's client factories that is once per upstream
#: connection, noise an operator cannot act on. They count as debug.
FACTORY_CHATTER = frozenset(
    ("Starting factory {factory!r}", "Stopping factory {factory!r}")
)


@implementer(ILogObserver)
class _LevelFilter:
    """Passes on events at a level or above (cheaper than a predicate chain).

    twisted.logger's LogLevelFilterPredicate looks the level up per
    namespace for every event; llmproxy has one level for everything.
    Twisted's factory start and stop lines (:data:`FACTORY_CHATTER`) are
    taken as debug events.
    """

    def __init__(self, observer: ILogObserver, minimum: LogLevel) -> None:
        self._observer = observer
        order = list(LogLevel.iterconstants())
        self._allowed = frozenset(order[order.index(minimum):])
        self._chatter = LogLevel.debug not in self._allowed

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        if level in self._allowed:
            if (
                self._chatter and level is LogLevel.info
                and event.get("log_format") in FACTORY_CHATTER
            ):
                return
            self._observer(event)


def console_observer(
    level: str = "info", stream: IO[str] | None = None, access: bool = True
) -> ILogObserver:
    """Readable one-line-per-event text output, filtered by level.

    Each event is Twisted's classic ``{time} [{system}] {message}`` line,
    with control characters, line separators, bidi overrides, surrogates
    and whatever the stream's encoding cannot hold written as escapes
    (``\\r``, ``\\n``, ``\\x1b``, ``\\u2028``, ``\\udc80``). A failure's
    traceback follows on continuation lines, escaped too, each starting
    with a tab.

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
    """Twisted's classic text lines, one per event, escaped where unsafe.

    Each event is ``{time} [{system}] {message}``, as twisted.logger's
    ``formatEventAsClassicLogText`` writes it, with a fast path for access
    records. The line is escaped first (:class:`Escaper`), so it stays one
    line whatever its fields hold. A failure's traceback follows on
    continuation lines, each escaped the same way and starting with a tab,
    as Twisted indents them: none can pass for an event line.
    """

    def __init__(self, stream: IO[str], access: bool = True) -> None:
        self._stream = stream
        self._access = access
        self._escaper = Escaper(getattr(stream, "encoding", None))
        self._narrow = self._escaper.narrow
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: object) -> str:
        """formatTime(when), which has one-second resolution, cached.

        Anything but a finite number of seconds gives ``-``.
        """
        if not isinstance(when, (int, float)):
            return "-"
        try:
            second = int(when)
            if second != self._second:
                self._second, self._stamp = second, formatTime(second)
        except (ValueError, OverflowError, OSError):
            return "-"
        return self._stamp

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == ACCESS_NAMESPACE:
            if not self._access:
                return
            try:
                text = event["log_format"].format(**event)
                if not text.isprintable() or (self._narrow and not text.isascii()):
                    text = self._escaper.escape(text)
                stamp = self._time(event["log_time"])
                line = f"{stamp} [{ACCESS_NAMESPACE}#info] {text}\n"
            except Exception:  # noqa: BLE001 - anything odd takes the slow path
                line = self._format(event)
        else:
            line = self._format(event)
        if line:
            self._stream.write(line)
            self._stream.flush()

    def _format(self, event: LogEvent) -> str | None:
        """An event as escaped classic log text.

        Args:
            event: Any event.

        Returns:
            The text to write, or None when the event has neither a message
            nor a failure (Twisted prints nothing for those either).
        """
        message = formatEvent(event)
        failure = event.get("log_failure")
        if not message and failure is None:
            return None
        line = self._escaper.safe(
            f"{self._time(event.get('log_time'))} [{_system(event)}] {message}"
        )
        if failure is None:
            return line + "\n"
        try:
            traceback = failure.getTraceback()
        except Exception as e:  # noqa: BLE001 - the event is still printed
            traceback = f"(UNABLE TO OBTAIN TRACEBACK FROM EVENT): {safe_repr(e)}"
        safe = self._escaper.safe
        parts = traceback.split("\n")
        return line + "".join(f"\n\t{safe(part)}" for part in parts) + "\n"


def _system(event: LogEvent) -> str:
    """The ``[system]`` of a classic log line, by Twisted's documented rule.

    Args:
        event: Any event.

    Returns:
        ``log_system`` if set, else ``{log_namespace}#{level name}``, each
        ``-`` when missing; ``UNFORMATTABLE`` when that cannot be made.
    """
    try:
        system = event.get("log_system")
        if system is not None:
            return str(system)
        level = event.get("log_level")
        name = "-" if level is None else level.name
        return f"{event.get('log_namespace', '-')}#{name}"
    except Exception:  # noqa: BLE001 - the event is still printed
        return "UNFORMATTABLE"


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
