"""``twistd llmproxy``: options and the service tree.

``makeService`` loads the config and builds a MultiService: the JSON log
file, the demo upstream when ``demo_upstream`` is set, the public listener,
the admin listener (metrics, health) and a service that closes the upstream
connection pools on stop.
"""

from __future__ import annotations

import sys
from typing import Any

from collections.abc import Callable, Mapping

import attrs
import yaml

import gc
import os
import signal
import socket

from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, globalLogBeginner
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.python.failure import Failure

from llmproxy.config import Config, ConfigError, load_config, redact_url
from llmproxy import logs
from llmproxy._accept import lighten_port
from llmproxy._loop import lighten
from llmproxy.logs import file_log_service
from llmproxy.web import build_admin_resource, build_resource, build_site

__all__ = ["Options", "makeService"]

DEFAULT_CONFIG = "etc/config.yml"

_log = Logger()


def _fail(message: str) -> SystemExit:
    """A one-line, traceback-free exit for a user's mistake."""
    return SystemExit(f"llmproxy: {message}")


class Options(usage.Options):
    """Command-line options of ``twistd llmproxy``."""

    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The YAML config file."],
    ]
    optFlags = [
        [
            "check",
            None,
            "Validate the config, print it with defaults filled in and secrets "
            "redacted, and exit (0: valid, 1: not) without listening.",
        ],
    ]

    def postOptions(self) -> None:
        """Load and validate the config file.

        A bad config exits with one line naming the key; twistd's own
        UsageError handling would print the whole usage text around it.
        """
        try:
            self.loaded: Config = load_config(self["config"])
            if self["check"]:
                build_resource(self.loaded, _NoReactor())  # keys files, endpoints...
        except ConfigError as e:
            raise _fail(f"config error: {e}") from None
        if self["check"]:
            sys.stdout.write(f"# {self['config']}: valid\n")
            sys.stdout.write(dump_config(self.loaded))
            sys.stdout.flush()
            raise SystemExit(0)
        parent = getattr(self, "parent", None)
        if parent is not None and parent.get("nodaemon") and not parent.get("logger"):
            # In the foreground (systemd, journald), log readable lines to
            # stdout at log.level instead of twistd's unfiltered default.
            if parent.get("logfile") in (None, "-"):
                logs.twistd_console_level = self.loaded.log.level
                logs.twistd_console_access = self.loaded.log.console_access
                parent["logger"] = "llmproxy.logs.twistd_console_observer"


class _NoReactor:
    """Enough of a reactor to build the resource for --check (never runs)."""

    nameResolver = None

    def seconds(self) -> float:
        return 0.0

    def callLater(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("--check never schedules anything")


def dump_config(config: Config) -> str:
    """The effective config as YAML, secrets redacted.

    Args:
        config: A validated configuration.

    Returns:
        YAML text: every key with its value or default; the proxy password,
        route api_keys and client keys shown as ``***``.
    """
    return yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False)


def _plain(value: Any, key: str = "") -> Any:
    """Turn config objects into YAML-able data, hiding secrets."""
    if attrs.has(type(value)):
        return {
            field.name: _plain(getattr(value, field.name), field.name)
            for field in attrs.fields(type(value))
            if field.name != "source"
        }
    if isinstance(value, Mapping):
        return {k: _plain(v, k) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        if key == "keys":
            return ["***" for _ in value]
        return [_plain(v) for v in value]
    if key == "api_key" and value is not None:
        return "***"
    if key == "proxy_url" and value is not None:
        return redact_url(value).strip("'")
    return value


class _CloseService(Service):
    """Runs a close callable when the daemon stops."""

    def __init__(self, close: Any) -> None:
        self._close = close

    def stopService(self) -> Any:
        super().stopService()
        return self._close()


class _Listener(Service):
    """Listens on an endpoint; startup fails if the port cannot be bound.

    Attributes:
        port: The listening port, once listening.
    """

    def __init__(
        self, reactor: Any, description: str, factory: Any, key: str,
        on_listening: Callable[[], None] | None = None,
    ) -> None:
        try:
            self._endpoint = serverFromString(reactor, description)
        except (ValueError, KeyError, TypeError) as e:
            raise _fail(
                f"config error: {key}: not a valid endpoint {description!r}: {e}"
            ) from None
        self._factory = factory
        self._on_listening = on_listening
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[Any] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        # Endpoint listens fail synchronously (port in use, permission):
        # raising here makes twistd exit non-zero instead of serving nothing.
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        if outcome:
            self.port = outcome[0]
            lighten_port(self.port)
            if self._on_listening is not None:
                self._on_listening()

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class _AdoptedListener(_Listener):
    """Serves on a listening socket inherited from the first worker."""

    def __init__(self, reactor: Any, fd: int, factory: Any, on_listening: Callable[[], None]):
        self._reactor = reactor
        self._fd = fd
        self._factory = factory
        self._on_listening = on_listening
        self.port: Any = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        with socket.socket(fileno=os.dup(self._fd)) as inherited:
            family = inherited.family
        self.port = self._reactor.adoptStreamPort(self._fd, family, self._factory)
        lighten_port(self.port)
        os.close(self._fd)  # the port holds its own duplicate
        self._on_listening()


class _WorkerProcess(ProcessProtocol):
    """One extra worker, as seen from the first."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        _log.info("worker {worker} ended: {reason}", worker=self.number,
                  reason=reason.getErrorMessage())
        self.ended.callback(None)


class _Workers(Service):
    """Starts workers 2..N on the first worker's listening socket.

    They adopt the socket (``adoptStreamPort``), so one port is served by N
    processes; SIGHUP and SIGTERM are passed on to them.
    """

    def __init__(self, reactor: Any, listener: _Listener, count: int, path: str) -> None:
        self._reactor = reactor
        self._listener = listener
        self._count = count
        self._path = path
        self.workers: list[_WorkerProcess] = []

    def startService(self) -> None:
        super().startService()
        fd = self._listener.port.fileno()
        for number in range(2, self._count + 1):
            worker = _WorkerProcess(number)
            self._reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, "-m", "llmproxy.tap", "--worker", str(number),
                 "--config", self._path],
                env=os.environ.copy(),
                childFDs={0: 0, 1: 1, 2: 2, _WORKER_FD: fd},
            )
            self.workers.append(worker)

    def signal(self, name: str) -> None:
        """Pass a signal on to every worker still running."""
        for worker in self.workers:
            if not worker.ended.called:
                try:
                    worker.transport.signalProcess(name)
                except ProcessExitedAlready:
                    pass

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.signal("TERM")
        return gatherResults([w.ended for w in self.workers])


#: The file descriptor on which workers 2..N find the listening socket.
_WORKER_FD = 3

#: Middle-generation collections between two full ones (Python's default
#: is 10; see _freeze_startup_objects).
FULL_COLLECTION_EVERY = 100


#: Open files below which the daemon warns at startup: each stream holds
#: two (the client's connection and the upstream's).
ENOUGH_OPEN_FILES = 4096
#: What the soft limit is raised to when the hard limit is unlimited (which
#: Linux never reports for open files; some BSDs do, and cap the soft limit
#: lower: then the raise fails and is reported).
_OPEN_FILES_CEILING = 1 << 20


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
    from twisted.internet._threadedselect import ThreadedSelectReactor
    from twisted.internet.selectreactor import SelectReactor

    if isinstance(reactor, (SelectReactor, ThreadedSelectReactor)):
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


def _freeze_startup_objects() -> None:
    """Keep what startup made (modules, classes, config) out of GC passes.

    Python's oldest-generation collection walks every tracked object; with
    1,000 streams in flight one took 60-80 ms, a pause every stream waited
    through, and collections took 8 % of the CPU. ``gc.freeze`` moves the
    ~55,000 startup objects out of its sight (``gc.freeze``'s documented
    use after startup). Called when the daemon owns its process (the twistd
    plugin's service, a worker), not for a resource mounted in another
    application. Frozen objects are still freed by reference counting, but
    a reference cycle among them would stay: after a reload, once the old
    config's last request is done, this runs again, thawing everything,
    collecting (the old config's cycles too) and freezing what is left.

    Full collections then still walk every object of the requests in
    flight: with 1,000 streams open one took 30-50 ms, and at 1,000 new
    streams a second Python's default (a full collection after every 10
    middle-generation ones, about every 2 s there) spent 1-2 % of the core
    on them. A request's objects are freed by reference counting (a
    streamed request leaves no reference cycle: loads of 300 to 5,000
    streams left the collector the same 2,611 objects as a daemon started
    and stopped with no load), so full collections come after
    :data:`FULL_COLLECTION_EVERY` middle-generation ones instead; the
    younger generations, which catch short-lived cycles (an error's
    traceback, say), are left as they are. (A collector that ignores the
    third threshold, such as a free-threaded build's, is unchanged.)
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    first, second, third = gc.get_threshold()
    gc.set_threshold(first, second, max(third, FULL_COLLECTION_EVERY))
    _log.debug("{count} startup objects frozen for the garbage collector; a full "
               "collection after every {every} middle-generation ones",
               count=gc.get_freeze_count(), every=gc.get_threshold()[2])


class Daemon(MultiService):
    """The daemon's services, with a graceful stop and reload on SIGHUP.

    On stop (SIGTERM): stop accepting, let requests in flight finish for up
    to ``shutdown_grace`` seconds, close the rest, then stop everything else
    (the log file last). With ``handle_signals``, SIGTERM stops the reactor
    without twistd re-raising it (exit status 0) and SIGHUP re-reads the
    config file.

    Attributes:
        config: The config in force.
        root: The proxy's root resource.
    """

    def __init__(self, config: Config, reactor: Any, root: Any, path: str | None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.root = root
        self.path = path
        self.handle_signals = False
        self._previous: dict[int, Any] = {}
        #: Fires when the proxy retired by the last reload is done.
        self._retiring: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        if self.handle_signals:
            # After the children started, so that the log file has it too
            # (nothing is accepted before the reactor runs).
            _raise_open_file_limit(self.reactor)
            # The reactor installs its own handlers while it starts; ours
            # replace them once it has.
            self.reactor.callLater(0, self._install_signals)
            self.reactor.callLater(0, _freeze_startup_objects)

    def _install_signals(self) -> None:
        if not self.running:
            return
        for number, handler in ((signal.SIGTERM, self._on_term), (signal.SIGHUP, self._on_hup)):
            self._previous[number] = signal.signal(number, handler)

    def _on_term(self, number: int, frame: Any) -> None:
        # Signal handlers only schedule work on the reactor: they interrupt
        # whatever runs, possibly a log observer holding its lock, so they
        # must not even log. Stopping this way (not Twisted's own SIGTERM
        # handler) ends with exit status 0.
        self.reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        _log.info("received SIGTERM: stopping gracefully")
        self.reactor.stop()

    def _on_hup(self, number: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reload_all)

    def _reload_all(self) -> None:
        if self.reload() and self._retiring is not None:
            # The old config's objects were frozen at startup: collect them
            # (cycles included) once its last request is done.
            self._retiring.addBoth(lambda _: _freeze_startup_objects())
        workers = self._workers()
        if workers is not None:
            workers.signal("HUP")

    def _workers(self) -> _Workers | None:
        try:
            return self.getServiceNamed("workers")
        except KeyError:
            return None

    def reload(self) -> bool:
        """Re-read the config file; apply it to new requests if valid.

        Returns:
            Whether the new config was applied.
        """
        if self.path is None:
            return False
        try:
            config = load_config(self.path)
            new_root = build_resource(config, self.reactor, metrics=self.root.metrics)
        except ConfigError as e:
            _log.error(
                "config reload refused, the running config stays in force: {error}",
                error=str(e),
            )
            return False
        for key in ("listen", "admin_listen", "log", "demo_upstream"):
            if getattr(config, key) != getattr(self.config, key):
                _log.warn("config reload: {key} changes only on restart", key=key)
        new_root.proxy.worker = self.root.proxy.worker
        self._retiring = self.root.replace(new_root)
        self.config = config
        _log.info("config reloaded from {path}", path=self.path)
        return True

    def stopService(self) -> Deferred[None]:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        listeners = []
        for name in ("web", "admin"):
            try:
                listeners.append(maybeDeferred(self.getServiceNamed(name).stopService))
            except KeyError:
                pass
        workers = self._workers()
        if workers is not None:
            listeners.append(maybeDeferred(workers.stopService))
        stopped = gatherResults(listeners)
        stopped.addCallback(lambda _: self._drain())
        stopped.addCallback(lambda _: MultiService.stopService(self))
        return stopped

    def _drain(self) -> Deferred[Any]:
        """Wait (up to shutdown_grace) for requests in flight, then close them."""
        proxies = self.root.proxies()
        grace = self.config.shutdown_grace
        if not any(p.inflight for p in proxies):
            return succeed(None)
        _log.info(
            "stopped accepting; waiting up to {grace} s for requests in flight", grace=grace
        )
        drained = gatherResults([p.drain() for p in proxies])

        def timed_out(failure: Failure) -> None:
            failure.trap(CancelledError, TimeoutError)
            _log.warn(
                "shutdown_grace ({grace} s) is over: closing the requests still in flight",
                grace=grace,
            )
            for proxy in proxies:
                proxy.abort_inflight()

        return drained.addTimeout(grace, self.reactor).addErrback(timed_out)


def makeService(options: Options) -> MultiService:
    """Build the daemon's services from parsed options.

    Args:
        options: Parsed :class:`Options` (the config is loaded already).

    Returns:
        The MultiService that twistd runs (it handles SIGTERM and SIGHUP).
    """
    from twisted.internet import reactor

    config = getattr(options, "loaded", None) or load_config(options["config"])
    daemon = build_service(config, reactor, path=options["config"])
    daemon.handle_signals = True
    lighten(reactor)
    return daemon


def build_service(
    config: Config, reactor: Any, path: str | None = None, worker: int = 1
) -> Daemon:
    """Build the daemon's services for a config.

    Args:
        config: The validated configuration.
        reactor: The reactor to run on.
        path: The config file (for reloads and further workers).
        worker: This process's worker number; workers after the first adopt
            the first one's listening socket, write their own log file and
            run no admin listener or demo upstream.

    Returns:
        A MultiService with the log file (if configured), the demo upstream
        (if configured), the public listener, the admin listener and the
        pool closer.
    """
    try:
        root = build_resource(config, reactor)
    except ConfigError as e:
        raise _fail(f"config error: {e}") from None
    if getattr(config, "workers", 1) > 1:
        root.proxy.worker = worker
    top = Daemon(config, reactor, root, path)
    if config.log.file:
        logs = file_log_service(
            worker_log_file(config.log.file, worker),
            max_bytes=config.log.max_bytes,
            backups=config.log.backups,
            compress=config.log.compress,
            level=config.log.level,
            reactor=reactor,
        )
        logs.setName("log-file")
        logs.setServiceParent(top)
    if config.demo_upstream is not None and worker == 1:
        from llmproxy.testing.upstream import FakeUpstreamService

        demo = FakeUpstreamService(reactor, config.demo_upstream)
        demo.setName("demo-upstream")
        demo.setServiceParent(top)
    root.ready = False

    def listening() -> None:
        root.ready = True

    site = build_site(config, reactor, root)
    if worker == 1:
        listener: Service = _Listener(reactor, config.listen, site, "listen", listening)
    else:
        listener = _AdoptedListener(reactor, _WORKER_FD, site, listening)
    listener.setName("web")
    listener.setServiceParent(top)
    workers = getattr(config, "workers", 1)
    if worker == 1 and workers > 1:
        if path is None:
            raise _fail("workers > 1 needs the config file's path")
        spawner = _Workers(reactor, listener, workers, path)
        spawner.setName("workers")
        spawner.setServiceParent(top)
    if config.admin_listen is not None and worker == 1:
        admin_site = build_site(config, reactor, build_admin_resource(root))
        admin = _Listener(reactor, config.admin_listen, admin_site, "admin_listen")
        admin.setName("admin")
        admin.setServiceParent(top)
    closer = _CloseService(root.close)
    closer.setName("upstream-pool")
    closer.setServiceParent(top)
    return top


def worker_log_file(path: str, worker: int) -> str:
    """Worker N's log file: ``logs/llmproxy.log`` -> ``logs/llmproxy-worker2.log``.

    Args:
        path: The configured ``log.file``.
        worker: The worker number (1 keeps the configured name).

    Returns:
        The file this worker writes (each rotates its own).
    """
    if worker == 1:
        return path
    base, ext = os.path.splitext(path)
    return f"{base}-worker{worker}{ext}"


def _worker_main(argv: list[str]) -> None:
    """Run worker N (2..workers): ``python -m llmproxy.tap --worker N --config F``."""
    import argparse

    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m llmproxy.tap")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise _fail(f"config error: {e}") from None
    logs.twistd_console_level = config.log.level
    logs.twistd_console_access = config.log.console_access
    globalLogBeginner.beginLoggingTo(
        [logs.console_observer(config.log.level, access=config.log.console_access)],
        redirectStandardIO=False,
    )
    daemon = build_service(config, reactor, args.config, worker=args.worker)
    daemon.handle_signals = True
    lighten(reactor)
    daemon.privilegedStartService()
    reactor.callWhenRunning(daemon.startService)
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)
    _log.info("worker {worker} serving", worker=args.worker)
    reactor.run()


if __name__ == "__main__":  # pragma: no cover
    if "--worker" in sys.argv:
        _worker_main(sys.argv[1:])
    else:
        sys.exit("run me with: twistd -n llmproxy --config FILE")
