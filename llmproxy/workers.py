"""``workers: N``: the extra processes serving the first one's listening socket.

The first process (twistd) listens and starts workers 2..N with
``python -m llmproxy.workers --worker K --config FILE`` (:class:`Workers`).
Each finds the listening socket on file descriptor :data:`WORKER_FD`, adopts
it and runs the same daemon (:func:`worker_main`), writing its own log file
(:func:`worker_log_file`). SIGHUP and SIGTERM received by the first process
are passed on to them.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, globalLogBeginner
from twisted.python.failure import Failure

from llmproxy import logs
from llmproxy.config import ConfigError, load_config
from llmproxy.daemon import one_line_exit

if TYPE_CHECKING:
    from llmproxy.daemon import Listener

__all__ = ["WORKER_FD", "Workers", "worker_log_file", "worker_main"]

#: The file descriptor on which workers 2..N find the listening socket.
WORKER_FD = 3

_log = Logger()


class _WorkerProcess(ProcessProtocol):
    """One extra worker, as seen from the first."""

    def __init__(self, number: int) -> None:
        """Name the worker.

        Args:
            number: Its worker number (2..N).
        """
        self.number = number
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        """Log the end and fire :attr:`ended`.

        Args:
            reason: How the process ended.
        """
        _log.info("worker {worker} ended: {reason}", worker=self.number,
                  reason=reason.getErrorMessage())
        self.ended.callback(None)


class Workers(Service):
    """Starts workers 2..N on the first worker's listening socket.

    They adopt the socket (``adoptStreamPort``), so one port is served by N
    processes; SIGHUP and SIGTERM are passed on to them.

    Attributes:
        workers: The processes started, in worker order.
    """

    def __init__(self, reactor: Any, listener: Listener, count: int, path: str) -> None:
        """Remember what to start.

        Args:
            reactor: The reactor to spawn the processes with.
            listener: The first worker's listener (listening once started).
            count: The number of workers, this one included.
            path: The config file the workers load.
        """
        self._reactor = reactor
        self._listener = listener
        self._count = count
        self._path = path
        self.workers: list[_WorkerProcess] = []

    def startService(self) -> None:
        """Start workers 2..N, each with the listening socket as WORKER_FD."""
        super().startService()
        fd = self._listener.port.fileno()
        for number in range(2, self._count + 1):
            worker = _WorkerProcess(number)
            self._reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, "-m", "llmproxy.workers", "--worker", str(number),
                 "--config", self._path],
                env=os.environ.copy(),
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


def worker_main(argv: list[str]) -> None:
    """Run worker N (2..workers): ``python -m llmproxy.workers --worker N --config F``.

    Args:
        argv: The command-line arguments after the program name.
    """
    import argparse

    # Imported here: llmproxy.tap builds the service tree and imports this
    # module for it.
    from llmproxy.tap import build_service
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m llmproxy.workers")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise one_line_exit(f"config error: {e}") from None
    logs.twistd_console_level = config.log.level
    logs.twistd_console_access = config.log.console_access
    globalLogBeginner.beginLoggingTo(
        [logs.console_observer(config.log.level, access=config.log.console_access)],
        redirectStandardIO=False,
    )
    daemon = build_service(config, reactor, args.config, worker=args.worker)
    daemon.handle_signals = True
    daemon.privilegedStartService()
    reactor.callWhenRunning(daemon.startService)
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)
    _log.info("worker {worker} serving", worker=args.worker)
    reactor.run()


if __name__ == "__main__":  # pragma: no cover
    worker_main(sys.argv[1:])
