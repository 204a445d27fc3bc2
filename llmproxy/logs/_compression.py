"""Compression jobs for rotated log files: :class:`CompressionQueue`.

Jobs run in the reactor's thread pool, one at a time, oldest backup first;
:class:`~llmproxy.logs.RotatingJSONLog` queues one per rotation.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="llmproxy.logs")


class CompressionQueue:
    """Runs a blocking job per backup in a thread pool, one job at a time.

    A failed job is logged and the queue goes on with the next backup.
    The queue is bounded: when it is full, adding a backup drops the
    oldest waiting one (a backup that pruning would delete anyway is not
    worth compressing).
    """

    def __init__(self, reactor: Any, job: Callable[[str], None], size: int) -> None:
        """Start with no jobs.

        Args:
            reactor: Provides ``callFromThread`` (the way back to the
                reactor thread) and ``getThreadPool`` (where jobs run:
                anything with ThreadPool's ``callInThreadWithCallback``).
            job: Compresses one backup, given its path (blocking); runs in
                the thread pool.
            size: How many backups may wait (at least 1).
        """
        self._reactor = reactor
        self._job = job
        self._lock = threading.Lock()
        # Backups waiting, whether a job runs, and the drained() callers
        # waiting for the queue to empty.
        self._pending: deque[str] = deque(maxlen=size)
        self._running = False
        self._waiters: list[Deferred[None]] = []

    def add(self, backups: list[str]) -> None:
        """Queue jobs and have the reactor thread start them (any thread).

        Args:
            backups: Uncompressed backups, oldest first; none is a no-op.
        """
        if not backups:
            return
        with self._lock:
            self._pending.extend(backups)
        self._reactor.callFromThread(self._kick)

    def drained(self) -> Deferred[None]:
        """Wait for the queue to empty; call it on the reactor thread.

        Returns:
            A Deferred that fires when no job runs and none waits.
        """
        d: Deferred[None] = Deferred()
        with self._lock:
            self._waiters.append(d)
        self._kick()
        return d

    def _kick(self) -> None:
        """Start the next job, or wake :meth:`drained` callers.

        Runs on the reactor thread.
        """
        with self._lock:
            if self._running:
                return
            if self._pending:
                backup = self._pending.popleft()
                self._running = True
                waiters: list[Deferred[None]] = []
            else:
                backup = None
                waiters, self._waiters = self._waiters, []
        if backup is None:
            for waiter in waiters:
                waiter.callback(None)
            return
        reactor = self._reactor
        try:
            d = deferToThreadPool(reactor, reactor.getThreadPool(), self._job, backup)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addErrback(self._failed, backup)
        d.addBoth(self._done)

    def _failed(self, failure: Failure, backup: str) -> None:
        """Log a failed job; the backup stays uncompressed.

        Args:
            failure: Why it failed.
            backup: The backup it was compressing.
        """
        log.failure("Could not compress rotated log {backup}", failure, backup=backup)

    def _done(self, _: object) -> None:
        """A job finished: start the next one (reactor thread).

        Args:
            _: The job's result, ignored.
        """
        with self._lock:
            self._running = False
        self._kick()
