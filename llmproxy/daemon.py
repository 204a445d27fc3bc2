"""The daemon's lifecycle: listeners, signals, the open-file limit.

:class:`Daemon` is the MultiService that twistd (or a worker process) runs:
on SIGTERM it stops listening, lets its ``gateway`` service drain the
requests in flight, then stops the rest; on SIGHUP it calls the reload
callable it was given. When it owns its process it also raises the
open-file limit (:func:`raise_open_file_limit`). :class:`Listener` and
:class:`AdoptedListener` are its listening services: on an endpoint string,
or on a socket inherited from the first worker. What the services are is
:mod:`llmproxy.app`'s business.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure

__all__ = [
    "ENOUGH_OPEN_FILES",
    "AdoptedListener",
    "Daemon",
    "Listener",
    "one_line_exit",
    "raise_open_file_limit",
]

_log = Logger()


def one_line_exit(message: str) -> SystemExit:
    """A one-line, traceback-free exit for a user's mistake.

    Args:
        message: What went wrong, such as ``config error: listen: ...``.

    Returns:
        The exception to raise: its message is ``llmproxy: `` and ``message``.
    """
    return SystemExit(f"llmproxy: {message}")


def config_error_exit(error: Any) -> SystemExit:
    """The exit for a bad config: one line for each of its mistakes.

    Args:
        error: A ConfigError (or ConfigErrors): each mistake names its key
            path and, when the file has it, its line and column.

    Returns:
        The exception to raise: ``llmproxy: config error: ...`` lines.
    """
    return SystemExit("\n".join(
        f"llmproxy: config error: {mistake.describe()}" for mistake in error.errors
    ))


def _watch(factory: Any, port: Any) -> None:
    """Let the Site pause ``port`` at max_connections (LLMProxySite)."""
    watch = getattr(factory, "watch_port", None)
    if watch is not None:
        watch(port)


class Listener(Service):
    """Listens on an endpoint; startup fails if the port cannot be bound.

    Attributes:
        port: The listening port, once listening.
    """

    def __init__(
        self, reactor: Any, description: str, factory: Any, key: str,
        on_listening: Callable[[], None] | None = None,
    ) -> None:
        """Parse the endpoint (a bad one is a one-line exit naming ``key``).

        Args:
            reactor: The reactor to listen with.
            description: A server endpoint string.
            factory: The protocol factory to serve.
            key: The config key ``description`` came from.
            on_listening: Called once the port listens.
        """
        try:
            self._endpoint = serverFromString(reactor, description)
        except (ValueError, KeyError, TypeError) as e:
            raise one_line_exit(
                f"config error: {key}: not a valid endpoint {description!r}: {e}"
            ) from None
        self._factory = factory
        self._on_listening = on_listening
        self.port: Any = None

    def privilegedStartService(self) -> None:
        """Listen (before twistd drops privileges); raise if that fails."""
        super().privilegedStartService()
        outcome: list[Any] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        # Endpoint listens fail synchronously (port in use, permission):
        # raising here makes twistd exit non-zero instead of serving nothing.
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        if outcome:
            self.port = outcome[0]
            _watch(self._factory, self.port)
            if self._on_listening is not None:
                self._on_listening()

    def stopService(self) -> Any:
        """Stop listening.

        Returns:
            A Deferred that fires once the port is closed, or None.
        """
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            unwatch = getattr(self._factory, "unwatch_port", None)
            if unwatch is not None:
                unwatch(port)
            return port.stopListening()
        return None


class AdoptedListener(Listener):
    """Serves on a listening socket inherited from the first worker.

    The socket is adopted through Twisted's ``AdoptedStreamServerEndpoint``,
    wrapped in the PROXY protocol parser (``twisted.protocols.haproxy``)
    when the first worker listens on a ``haproxy:`` endpoint, so that every
    worker reads the header the balancer sends.
    """

    def __init__(
        self, reactor: Any, fd: int, factory: Any, on_listening: Callable[[], None],
        proxy_protocol: bool = False,
    ):
        """Remember the socket.

        Args:
            reactor: The reactor to adopt the socket with (``IReactorSocket``).
            fd: The inherited listening socket's file descriptor.
            factory: The protocol factory to serve.
            on_listening: Called once the port listens.
            proxy_protocol: Whether connections start with a PROXY header
                (the ``listen`` endpoint is ``haproxy:``).
        """
        self._reactor = reactor
        self._fd = fd
        self._factory = factory
        self._on_listening = on_listening
        self._proxy_protocol = proxy_protocol
        self.port: Any = None

    def privilegedStartService(self) -> None:
        """Adopt the inherited socket (the endpoint closes our descriptor)."""
        Service.privilegedStartService(self)
        with socket.socket(fileno=os.dup(self._fd)) as inherited:
            family = inherited.family
        endpoint: Any = AdoptedStreamServerEndpoint(self._reactor, self._fd, family)
        if self._proxy_protocol:
            endpoint = proxyEndpoint(endpoint)
        outcome: list[Any] = []
        endpoint.listen(self._factory).addBoth(outcome.append)
        # Adopting is synchronous; a failure is raised to twistd.
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]
        _watch(self._factory, self.port)
        self._on_listening()


#: Open files below which the daemon warns at startup: each stream holds
#: two (the client's connection and the upstream's).
ENOUGH_OPEN_FILES = 4096
#: What the soft limit is raised to when the hard limit is unlimited (which
#: Linux never reports for open files; some BSDs do, and cap the soft limit
#: lower: then the raise fails and is reported).
_OPEN_FILES_CEILING = 1 << 20

#: The modules of Twisted's reactors built on ``select()``: the select
#: reactor and the threaded one (under wxreactor, say). Compared as names:
#: the threaded one's module is private, so it is never imported.
_SELECT_REACTOR_MODULES = frozenset({
    "twisted.internet.selectreactor",
    "twisted.internet._threadedselect",
})


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft open-file limit to its hard one (children
    inherit it).

    Returns:
        The soft limit before and after (equal when there was nothing to
        raise; ``resource.RLIM_INFINITY`` stays as it is).

    Raises:
        OSError, ValueError: The system refused the new limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft, soft
    target = _OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return soft, target
    return soft, soft


def _uses_select(reactor: Any) -> bool:
    """Say whether ``reactor`` is built on ``select()``.

    Args:
        reactor: A reactor.

    Returns:
        True when its class, or a class it derives from, is one of Twisted's
        select-based reactors.
    """
    return any(cls.__module__ in _SELECT_REACTOR_MODULES for cls in type(reactor).__mro__)


def _raise_open_file_limit(reactor: Any) -> None:
    """Raise the soft open-file limit to the hard one, as Go programs do.

    A shell's default soft limit is often 1,024 descriptors while the hard
    limit is far higher; each stream in flight holds two (the client's
    connection and the upstream's), so from such a shell ``twistd -n
    llmproxy`` could hold about 500 streams before accepts fail with
    ``EMFILE``. Under systemd the unit files set ``LimitNOFILE``. A reactor
    built on ``select()`` (which cannot watch descriptors past 1,024) keeps
    the limit it has. Called when the daemon owns its process, once its
    log file is open; never raises.

    Args:
        reactor: The reactor the daemon runs on.
    """
    if _uses_select(reactor):
        return
    try:
        import resource

        before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # not POSIX
        return
    try:
        before, soft = raise_open_file_limit()
    except (OSError, ValueError) as e:
        _log.warn(
            "could not raise the open-file limit from {soft} ({error}): "
            "each stream in flight holds two open files, so about {streams} at once",
            soft=before, error=str(e), streams=before // 2,
        )
        return
    if soft != before:
        _log.info("open-file limit raised from {soft} to {target}", soft=before, target=soft)
    if soft != resource.RLIM_INFINITY and soft < ENOUGH_OPEN_FILES:
        _log.warn(
            "the open-file limit is {limit}: each stream in flight holds two, so "
            "about {streams} at once; raise the hard limit (LimitNOFILE= under "
            "systemd, ulimit -Hn in a shell)",
            limit=soft, streams=soft // 2,
        )


class Daemon(MultiService):
    """The daemon's services, with a graceful stop and reload on SIGHUP.

    On stop (SIGTERM): stop the listeners (``web``, ``admin``) and the
    ``workers``, then the ``gateway`` (which lets requests in flight finish
    for up to ``shutdown_grace`` seconds), then everything else. With
    ``handle_signals``, SIGTERM stops the reactor without twistd re-raising
    it (exit status 0) and SIGHUP calls the reload callable, then passes
    SIGHUP on to the workers.
    """

    #: The services stopped first, in this order; the rest after them.
    STOP_FIRST = (("web", "admin", "workers"), ("gateway",))

    def __init__(
        self, reactor: Any, reload: Callable[[str], bool] | None = None,
        path: str | None = None,
    ) -> None:
        """Hold the reactor and the reload callable; no signal handling yet.

        Args:
            reactor: The reactor the daemon runs on.
            reload: Called with ``path`` on SIGHUP; says whether the new
                config was applied.
            path: The config file (None: no reloads).
        """
        super().__init__()
        self.reactor = reactor
        self.path = path
        self.handle_signals = False
        self._reload = reload
        self._previous: dict[int, Any] = {}

    def startService(self) -> None:
        """Start the children; with ``handle_signals``, take over the process."""
        super().startService()
        if self.handle_signals:
            # After the children started, so that the log file has it too
            # (nothing is accepted before the reactor runs).
            _raise_open_file_limit(self.reactor)
            # At once (the listeners are up: a signal may come now), and
            # again once the reactor, starting, has installed its own.
            self._install_signals()
            self.reactor.addSystemEventTrigger("after", "startup", self._install_signals)

    def _install_signals(self) -> None:
        """Handle SIGTERM and SIGHUP, remembering the handlers first replaced."""
        if not self.running:
            return
        for number, handler in ((signal.SIGTERM, self._on_term), (signal.SIGHUP, self._on_hup)):
            previous = signal.signal(number, handler)
            self._previous.setdefault(number, previous)

    def _on_term(self, number: int, frame: Any) -> None:
        """SIGTERM: schedule a graceful stop."""
        # Signal handlers only schedule work on the reactor: they interrupt
        # whatever runs, possibly a log observer holding its lock, so they
        # must not even log. Stopping this way (not Twisted's own SIGTERM
        # handler) ends with exit status 0.
        self.reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        """Stop the reactor (which stops this service)."""
        _log.info("received SIGTERM: stopping gracefully")
        self.reactor.stop()

    def _on_hup(self, number: int, frame: Any) -> None:
        """SIGHUP: schedule a reload."""
        self.reactor.callFromThread(self._reload_all)

    def _reload_all(self) -> None:
        """Reload here, then pass SIGHUP on to the other workers."""
        self.reload()
        workers = self._named("workers")
        if workers is not None:
            workers.signal("HUP")

    def _named(self, name: str) -> Any:
        """The child service called ``name``, if there is one."""
        try:
            return self.getServiceNamed(name)
        except KeyError:
            return None

    def reload(self) -> bool:
        """Re-read the config file; apply it to new requests if valid.

        Returns:
            Whether the new config was applied.
        """
        if self._reload is None or self.path is None:
            return False
        return self._reload(self.path)

    def stopService(self) -> Deferred[None]:
        """Stop the listeners and workers, then the gateway, then the rest.

        Returns:
            A Deferred that fires once every service has stopped.
        """
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        Service.stopService(self)
        stopped: Deferred[Any] = Deferred()
        stopped.callback(None)
        for names in self.STOP_FIRST:
            stopped.addCallback(lambda _, names=names: self._stop_all(
                [self._named(name) for name in names]
            ))
        stopped.addCallback(lambda _: self._stop_all(reversed(list(self))))
        return stopped.addCallback(lambda _: None)

    def _stop_all(self, services: Any) -> Deferred[Any]:
        """Stop the running ones of ``services`` together."""
        return gatherResults([
            maybeDeferred(service.stopService)
            for service in services if service is not None and service.running
        ])
