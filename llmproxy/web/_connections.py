"""The open client connections: how many each client has, which are idle;
the limits' defaults, and their throttled log lines.

:class:`ConnectionTable` is the Site's bookkeeping behind
``max_connections`` and ``max_connections_per_client``. It holds no socket
and reads no clock: the Site tells it what happened and asks it whom to
close. Its tables are bounded by the connections open: a client address is
kept only while it has one, and a connection is in the idle order only while
it waits for its next request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

__all__ = [
    "ConnectionTable",
    "Throttled",
    "default_max_connections",
    "default_max_connections_per_client",
    "is_proxy_protocol",
]

log = Logger(namespace="llmproxy.web")

#: Open files kept back from client connections by the default
#: max_connections: listening sockets, log files, DNS, the admin listener.
RESERVED_FILES = 64
#: Seconds between two log lines about the same connection limit.
LOG_EVERY = 10.0
#: The default max_connections_per_client is max_connections divided by
#: this, and at least :data:`MIN_PER_CLIENT`.
PER_CLIENT_SHARE = 16
MIN_PER_CLIENT = 8


def default_max_connections() -> int:
    """What the open-file limit allows: each client connection may hold an
    upstream connection too, and a few files are kept for the rest.

    Returns:
        ``(soft open-file limit - RESERVED_FILES) // 2``, at least 1; 100,000
        where the limit is unknown or unlimited.
    """
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 100_000
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(1, (soft - RESERVED_FILES) // 2)


def default_max_connections_per_client(max_connections: int) -> int:
    """The default share of ``max_connections`` one client address may hold.

    Args:
        max_connections: The site's connection limit.

    Returns:
        ``max_connections // PER_CLIENT_SHARE``, at least
        :data:`MIN_PER_CLIENT`.
    """
    return max(MIN_PER_CLIENT, max_connections // PER_CLIENT_SHARE)


def is_proxy_protocol(description: str | None) -> bool:
    """Whether a server endpoint string is a PROXY protocol (``haproxy:``) one.

    Args:
        description: A Twisted server endpoint string, or None.

    Returns:
        True when its first part is ``haproxy``.
    """
    if description is None:
        return False
    return description.split(":", 1)[0].strip().lower() == "haproxy"


class Throttled:
    """A log line written at most once every :data:`LOG_EVERY` seconds.

    Each line says (as ``count``) how many times it happened since the
    previous line, itself included.
    """

    def __init__(self, clock: IReactorTime, level: LogLevel, text: str) -> None:
        self._clock = clock
        self._level = level
        self._text = text
        self._count = 0
        self._last: float | None = None

    def __call__(self, **fields: Any) -> None:
        self._count += 1
        now = self._clock.seconds()
        if self._last is not None and now - self._last < LOG_EVERY:
            return
        log.emit(self._level, self._text, count=self._count, **fields)
        self._count = 0
        self._last = now

C = TypeVar("C", bound=Hashable)


class _Client(Generic[C]):
    """One client address's open connections: their number, the idle ones."""

    __slots__ = ("count", "idle")

    def __init__(self) -> None:
        self.count = 0
        self.idle: OrderedDict[C, None] = OrderedDict()


class ConnectionTable(Generic[C]):
    """Open connections, counted per client, with the idle ones in the order
    they became idle.

    A connection's client is the address it counts against, or None for one
    that counts against no client (a trusted proxy, a UNIX socket, a PROXY
    protocol connection whose header has not been read yet). Callers pass
    the same client for a connection in every call.

    Attributes:
        open: Connections open now.
    """

    def __init__(self) -> None:
        self.open = 0
        self._clients: dict[str, _Client[C]] = {}
        self._idle: OrderedDict[C, None] = OrderedDict()

    def __len__(self) -> int:
        return self.open

    @property
    def tracked_clients(self) -> int:
        """Client addresses with at least one open connection."""
        return len(self._clients)

    @property
    def idle(self) -> int:
        """Connections waiting for their next request."""
        return len(self._idle)

    def count(self, client: str | None) -> int:
        """Open connections of ``client`` (0 for None)."""
        if client is None:
            return 0
        entry = self._clients.get(client)
        return 0 if entry is None else entry.count

    def opened(self, client: str | None) -> None:
        """A connection opened, counting against ``client``."""
        self.open += 1
        self.add_client(client)

    def add_client(self, client: str | None) -> None:
        """Count an open connection against ``client`` once it is known."""
        if client is not None:
            entry = self._clients.get(client)
            if entry is None:
                entry = self._clients[client] = _Client()
            entry.count += 1

    def closed(self, connection: C, client: str | None) -> None:
        """A connection closed (or is being closed): forget it."""
        self.open -= 1
        self._idle.pop(connection, None)
        if client is None:
            return
        entry = self._clients[client]
        entry.idle.pop(connection, None)
        entry.count -= 1
        if entry.count == 0:
            del self._clients[client]

    def became_idle(self, connection: C, client: str | None) -> None:
        """``connection`` waits for its next request (youngest idle)."""
        self._idle[connection] = None
        if client is not None:
            self._clients[client].idle[connection] = None

    def became_busy(self, connection: C, client: str | None) -> None:
        """``connection`` is reading or answering a request again."""
        self._idle.pop(connection, None)
        if client is not None:
            self._clients[client].idle.pop(connection, None)

    def oldest_idle(self, client: str | None = None) -> C | None:
        """The connection idle the longest, of ``client`` or of anyone.

        Args:
            client: Only ``client``'s connections; None for all.

        Returns:
            The connection, or None when none is idle.
        """
        if client is None:
            idle = self._idle
        else:
            entry = self._clients.get(client)
            if entry is None:
                return None
            idle = entry.idle
        return next(iter(idle), None)
