"""twisted.logger observers: a rotating JSON file and readable console output.

:class:`RotatingJSONLog` writes one JSON line per event (twisted.logger's
own format, readable back with ``eventsFromJSONLogFile``), rotates the file
by size, gzips rotated files in a thread pool, one at a time, and keeps a
bounded number of them.

:func:`level_filtered` and :func:`console_observer` build filtered
observers; :class:`LogService` adds an observer to a log publisher while the
application runs and, on stop, waits for the observer to finish its
background work. :func:`file_log_service` puts the pieces together for the
daemon; an embedding application may add its own observers instead.
"""

from __future__ import annotations

from twisted.logger import ILogObserver

from llmproxy.logs._console import (
    LEVELS,
    console_observer,
    console_observer_factory,
    level_filtered,
)
from llmproxy.logs._file import RotatingJSONLog
from llmproxy.logs._gzip import gzip_file
from llmproxy.logs._lines import ACCESS_NAMESPACE as ACCESS_NAMESPACE
from llmproxy.logs._lines import event_line
from llmproxy.logs._service import LogService, file_log_service

__all__ = [
    "LEVELS",
    "LogService",
    "RotatingJSONLog",
    "console_observer",
    "console_observer_factory",
    "event_line",
    "file_log_service",
    "gzip_file",
    "level_filtered",
]


#: The level :func:`twistd_console_observer` filters at, and whether it
#: prints access records; ``twistd llmproxy`` sets both from the config
#: (``log.level``, ``log.console_access``) before twistd starts logging.
twistd_console_level = "info"
twistd_console_access = True


def twistd_console_observer() -> ILogObserver:
    """twistd's ``--logger``: readable lines on stdout at ``log.level``.

    twistd wants a dotted name of a zero-argument callable, so the level
    comes from :data:`twistd_console_level`.

    Returns:
        A console observer on standard output.
    """
    return console_observer(twistd_console_level, access=twistd_console_access)
