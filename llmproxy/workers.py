"""``workers: N``: the extra processes serving the first one's listening socket.

:func:`main_process` builds the first (or only) process's daemon: with
``workers`` above 1, it listens and starts workers 2..N with
``python -m llmproxy.workers --worker K --config FILE`` (:class:`Workers`).
Each finds the listening socket on file descriptor :data:`WORKER_FD`, adopts
it and runs the same daemon (:func:`worker_main`), writing its own log file.
SIGHUP and SIGTERM received by the first process are passed on to them.
Their metrics are summed through a directory the first process makes for
the run (:class:`MetricsDirectory`). The service trees themselves come from
:func:`llmproxy.app.build_daemon`.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import MutableMapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, globalLogBeginner
from twisted.python.failure import Failure

from llmproxy import logs
from llmproxy.app import build_daemon
from llmproxy.config import Config, ConfigError, load_config
from llmproxy.daemon import Daemon, Listener, config_error_exit, one_line_exit
from llmproxy.metrics import MULTIPROC_DIR_ENV, forget_process, multiprocess_possible

__all__ = [
    "WORKER_FD",
    "MetricsDirectory",
    "Workers",
    "main_process",
    "share_metrics",
    "worker_main",
]

#: The file descriptor on which workers 2..N find the listening socket.
WORKER_FD = 3

_log = Logger()


class MetricsDirectory(Service):
    """The run's directory where every worker writes its metrics.

    Made empty when created, named in :data:`MULTIPROC_DIR_ENV` for this
    process (before prometheus_client is imported: see
    :mod:`llmproxy.metrics`) and, through the environment, for the workers
    it spawns; removed when the daemon stops, or at exit if it never
    started.

    Attributes:
        path: The directory.
    """

    def __init__(self, reactor: Any, environ: MutableMapping[str, str] | None = None) -> None:
        """Make the directory and name it in the environment.

        Args:
            reactor: The reactor the daemon runs on.
            environ: The environment to set (``os.environ``).
        """
        self._reactor = reactor
        self._environ = os.environ if environ is None else environ
        self._previous = self._environ.get(MULTIPROC_DIR_ENV)
        # A new directory for each run: no file of an earlier run's process
        # (whose pid may come back) is ever summed.
        self.path = tempfile.mkdtemp(prefix="llmproxy-metrics-")
        self._environ[MULTIPROC_DIR_ENV] = self.path
        atexit.register(self.remove)

    def remove(self) -> None:
        """Remove the directory and restore the environment (idempotent)."""
        atexit.unregister(self.remove)
        shutil.rmtree(self.path, ignore_errors=True)
        if self._environ.get(MULTIPROC_DIR_ENV) == self.path:
            if self._previous is None:
                del self._environ[MULTIPROC_DIR_ENV]
            else:
                self._environ[MULTIPROC_DIR_ENV] = self._previous

    def stopService(self) -> Deferred[None]:
        """Remove the directory on the reactor's next turn.

        Connections aborted at the end of ``shutdown_grace`` are lost (and
        their requests counted) on that turn, not before.

        Returns:
            A Deferred that fires once the directory is gone.
        """
        super().stopService()
        return deferLater(self._reactor, 0, self.remove)


def share_metrics(config: Any, reactor: Any) -> MetricsDirectory | None:
    """Make the run's metrics directory when workers will share /metrics.

    Called by the first process before its instruments are built.

    Args:
        config: The validated configuration.
        reactor: The reactor the daemon runs on.

    Returns:
        The directory's service with ``workers`` above 1 and metrics on;
        None otherwise, or (with a warning) when prometheus_client was
        imported before without it: then ``/metrics`` reports the first
        worker alone.
    """
    if getattr(config, "workers", 1) <= 1 or not config.metrics:
        return None
    if not multiprocess_possible():
        _log.warn(
            "prometheus_client was imported before {variable} was set: "
            "/metrics reports worker 1 only",
            variable=MULTIPROC_DIR_ENV,
        )
        return None
    return MetricsDirectory(reactor)


class _WorkerProcess(ProcessProtocol):
    """One extra worker, as seen from the first."""

    def __init__(self, number: int, metrics_dir: str | None = None) -> None:
        """Name the worker.

        Args:
            number: Its worker number (2..N).
            metrics_dir: The shared metrics directory, if any.
        """
        self.number = number
        self.metrics_dir = metrics_dir
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        """Remember the process id (the transport forgets it at the end)."""
        self.pid = self.transport.pid

    def processEnded(self, reason: Failure) -> None:
        """Log the end, drop its live gauges, and fire :attr:`ended`.

        Args:
            reason: How the process ended.
        """
        _log.info("worker {worker} ended: {reason}", worker=self.number,
                  reason=reason.getErrorMessage())
        if self.metrics_dir is not None and self.pid is not None:
            forget_process(self.pid, self.metrics_dir)
        self.ended.callback(None)


class Workers(Service):
    """Starts workers 2..N on the first worker's listening socket.

    They adopt the socket (``adoptStreamPort``), so one port is served by N
    processes; SIGHUP and SIGTERM are passed on to them.

    Attributes:
        workers: The processes started, in worker order.
    """

    def __init__(
        self, reactor: Any, listener: Listener, count: int, path: str,
        metrics_dir: str | None = None,
    ) -> None:
        """Remember what to start.

        Args:
            reactor: The reactor to spawn the processes with.
            listener: The first worker's listener (listening once started).
            count: The number of workers, this one included.
            path: The config file the workers load.
            metrics_dir: The run's metrics directory (:class:`MetricsDirectory`),
                named in the workers' environment; None: metrics not shared.
        """
        self._reactor = reactor
        self._listener = listener
        self._count = count
        self._path = path
        self._metrics_dir = metrics_dir
        self.workers: list[_WorkerProcess] = []

    def startService(self) -> None:
        """Start workers 2..N, each with the listening socket as WORKER_FD."""
        super().startService()
        fd = self._listener.port.fileno()
        env = os.environ.copy()
        if self._metrics_dir is not None:
            env[MULTIPROC_DIR_ENV] = self._metrics_dir
        for number in range(2, self._count + 1):
            worker = _WorkerProcess(number, self._metrics_dir)
            self._reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, "-m", "llmproxy.workers", "--worker", str(number),
                 "--config", self._path],
                env=env,
                childFDs={0: 0, 1: 1, 2: 2, WORKER_FD: fd},
            )
            self.workers.append(worker)

    def signal(self, name: str) -> None:
        """Pass a signal on to every worker still running.

        Args:
            name: The signal's name without ``SIG`` (``"HUP"``, ``"TERM"``).
        """
        for worker in self.workers:
            if not worker.ended.called:
                try:
                    worker.transport.signalProcess(name)
                except ProcessExitedAlready:
                    pass

    def stopService(self) -> Deferred[Any]:
        """Send SIGTERM to the workers.

        Returns:
            A Deferred that fires once every worker has ended.
        """
        super().stopService()
        self.signal("TERM")
        return gatherResults([w.ended for w in self.workers])


def main_process(config: Config, reactor: Any, path: str | None) -> Daemon:
    """The first (or only) process's daemon.

    With ``workers`` above 1: the run's metrics directory (made before any
    instrument), the daemon, and workers 2..N started once it listens.

    Args:
        config: The validated configuration.
        reactor: The reactor to run on.
        path: The config file (for reloads, and for the workers to load).

    Returns:
        The daemon to run.
    """
    if config.workers <= 1:
        return build_daemon(config, reactor, path)
    if path is None:
        raise one_line_exit("workers > 1 needs the config file's path")
    shared = share_metrics(config, reactor)
    daemon = build_daemon(config, reactor, path)
    if shared is not None:
        # Stopped with the rest, after the workers have ended.
        shared.setName("metrics-dir")
        shared.setServiceParent(daemon)
    gateway = daemon.getServiceNamed("gateway")
    limits = gateway.proxies()[0].guard.limits
    if limits is not None and not limits.shared:
        _log.warn(
            "workers: {workers} without rate_limit.store: each worker keeps its own "
            "rate limits and budgets, so a client gets up to {workers} times its "
            "limit; set rate_limit.store to share them (docs/operations.md)",
            workers=config.workers,
        )
    spawner = Workers(reactor, daemon.getServiceNamed("web"), config.workers, path,
                      shared.path if shared is not None else None)
    spawner.setName("workers")
    spawner.setServiceParent(daemon)
    return daemon


def worker_main(argv: list[str]) -> None:
    """Run worker N (2..workers): ``python -m llmproxy.workers --worker N --config F``.

    Args:
        argv: The command-line arguments after the program name.
    """
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m llmproxy.workers")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise config_error_exit(e) from None
    logs.twistd_console_level = config.log.level
    logs.twistd_console_access = config.log.console_access
    globalLogBeginner.beginLoggingTo(
        [logs.console_observer(config.log.level, access=config.log.console_access)],
        redirectStandardIO=False,
    )
    daemon = build_daemon(config, reactor, args.config, worker=args.worker, listen_fd=WORKER_FD)
    daemon.handle_signals = True
    daemon.privilegedStartService()
    reactor.callWhenRunning(daemon.startService)
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)
    _log.info("worker {worker} serving", worker=args.worker)
    reactor.run()


if __name__ == "__main__":  # pragma: no cover
    worker_main(sys.argv[1:])
