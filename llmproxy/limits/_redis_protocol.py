"""txredisapi's side of the Redis connection: all that knows its names.

* :class:`RedisFactory`: the factory Twisted's ``ClientService`` builds
  txredisapi's ``RedisProtocol`` with, and the ``factory`` that protocol
  reports a failed AUTH or SELECT to.
* :func:`describe_error`: one line saying what kind of txredisapi error a
  command failed with.

txredisapi imports the global reactor when it is imported, so it is imported
only when a :class:`RedisFactory` is made (and after that by
:func:`describe_error`), never by importing this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocol
from twisted.internet.protocol import Factory

__all__ = ["RedisFactory", "describe_error"]


class RedisFactory(Factory):
    """Builds txredisapi protocols for ``ClientService`` and is their ``factory``.

    txredisapi's protocol authenticates and selects the database itself in
    ``connectionMade``. When that fails it calls ``stopTrying()`` and
    ``connectionError(message)`` on its factory and reads ``isLazy``: here
    nothing stops (the service keeps reconnecting, more slowly each time),
    the message is handed on, and ``isLazy`` is False so that txredisapi
    logs nothing of its own.

    Attributes:
        isLazy: Read by txredisapi after a failed AUTH or SELECT.
    """

    noisy = False
    isLazy = False

    def __init__(
        self,
        username: str | None,
        password: str | None,
        db: int,
        on_connection: Callable[[Any], None],
        on_ready: Callable[[Any], None],
        on_lost: Callable[[Any], None],
        on_setup_failed: Callable[[str], None],
    ) -> None:
        """Remember how to build and report connections.

        Args:
            username: For AUTH, or None.
            password: For AUTH, or None for no AUTH.
            db: The database to SELECT (none is sent for 0).
            on_connection: Called with each new protocol.
            on_ready: Called with a protocol once AUTH and SELECT succeeded.
            on_lost: Called with a protocol when its connection is gone.
            on_setup_failed: Called with txredisapi's message when AUTH or
                SELECT failed.
        """
        import txredisapi  # here, not at the top: it imports the global reactor

        self._protocol_class = txredisapi.RedisProtocol
        self._username = username
        self._password = password
        self._db = db
        self._on_connection = on_connection
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._on_setup_failed = on_setup_failed

    def buildProtocol(self, addr: IAddress) -> IProtocol:
        """Make one connection's protocol, watching it become ready and go.

        Args:
            addr: The peer's address.

        Returns:
            A ``txredisapi.RedisProtocol`` whose replies are bytes (no
            decoding, no number guessing).
        """
        protocol = self._protocol_class(
            charset=None,
            password=self._password,
            dbid=self._db or None,
            convertNumbers=False,
            username=self._username,
        )
        protocol.factory = self
        self._on_connection(protocol)
        protocol.whenConnected().addCallback(self._on_ready)
        protocol.whenDisconnected().addCallback(self._on_lost)
        return protocol

    def stopTrying(self) -> None:
        """Called by txredisapi after a failed AUTH or SELECT: keep trying.

        A password or ACL fixed on the server is picked up without a restart;
        the retries back off to about every 2 s meanwhile.
        """

    def connectionError(self, why: str) -> None:
        """Called by txredisapi with what failed in AUTH or SELECT.

        Args:
            why: txredisapi's message (Redis's error text; never the password).
        """
        self._on_setup_failed(why)


def describe_error(error: BaseException) -> str:
    """Say what a command failed with, by the kind of error.

    Args:
        error: What a command's Deferred failed with, or what sending it
            raised.

    Returns:
        ``Redis error: ...`` (Redis's own error text), ``connection to Redis
        failed: ...``, ``unexpected reply from Redis: ...``, or the error's
        type and text. It may hold the password: the caller redacts it.
    """
    import txredisapi  # imported already: only made factories lead here

    if isinstance(error, txredisapi.ResponseError):
        return f"Redis error: {error}"
    if isinstance(error, txredisapi.ConnectionError):
        return f"connection to Redis failed: {error}"
    if isinstance(error, (txredisapi.InvalidResponse, txredisapi.InvalidData)):
        return f"unexpected reply from Redis: {error}"
    return f"{type(error).__name__}: {error}"
