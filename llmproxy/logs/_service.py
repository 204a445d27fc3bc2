"""Services adding log observers while the application runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher

from llmproxy.logs._console import level_filtered, parse_level
from llmproxy.logs._file import RotatingJSONLog


class LogService(Service):
    """Adds an observer to a log publisher while the application runs.

    Attributes:
        observer: The observer.
        publisher: Where it is added.
    """

    def __init__(
        self,
        observer: ILogObserver,
        publisher: LogPublisher | None = None,
        close: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        """Remember what to add where, and how to close it.

        Args:
            observer: The observer.
            publisher: The publisher; the global one by default.
            close: Called on stop, after the observer is removed; its
                Deferred is returned from :meth:`stopService`.
        """
        self.observer = observer
        self.publisher = publisher if publisher is not None else globalLogPublisher
        self._close = close

    def startService(self) -> None:
        """Add the observer."""
        super().startService()
        self.publisher.addObserver(self.observer)

    def stopService(self) -> Deferred[None] | None:
        """Remove the observer and close it.

        Returns:
            The ``close`` callable's Deferred, if one was given.
        """
        super().stopService()
        self.publisher.removeObserver(self.observer)
        if self._close is None:
            return None
        return self._close()


def file_log_service(
    path: str,
    *,
    max_bytes: int = 100 * 1024 * 1024,
    backups: int = 20,
    compress: bool = True,
    level: str = "info",
    reactor: Any,
) -> LogService:
    """A service logging to a rotating JSON file at ``level`` and above.

    Args:
        path: The live log file; its folder is created if missing.
        max_bytes: Rotate before the file would grow past this size.
        backups: Rotated files to keep.
        compress: Gzip rotated files in the reactor's thread pool.
        level: One of :data:`LEVELS`.
        reactor: The reactor.

    Returns:
        The service; stopping it waits for pending compression.

    Raises:
        ValueError: A bad ``level``, ``max_bytes`` or ``backups``.
        OSError: The folder cannot be created or the file opened.
    """
    parse_level(level)
    observer = RotatingJSONLog(
        path, max_bytes=max_bytes, backups=backups, compress=compress, reactor=reactor
    )
    return LogService(level_filtered(observer, level), close=observer.close)
