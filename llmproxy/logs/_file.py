"""The rotating JSON log file: :class:`RotatingJSONLog`.

The observer writes lines, rotates the live file and decides when backups
are compressed and pruned. The backup files themselves (names, pruning,
recovery) are handled by :class:`~llmproxy.logs._backups.Backups`, the
compression jobs run through
:class:`~llmproxy.logs._compression.CompressionQueue`, and the default
compressor, :func:`~llmproxy.logs.gzip_file`, lives in ``_gzip``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

from llmproxy.logs._backups import Backups
from llmproxy.logs._compression import CompressionQueue
from llmproxy.logs._gzip import gzip_file
from llmproxy.logs._lines import event_line, safe_repr


@implementer(ILogObserver)
class RotatingJSONLog:
    """A log observer writing JSON lines to a file rotated by size.

    Each event becomes one line written with one ``write`` system call on
    an unbuffered, append-mode file descriptor, so a line is in the
    operating system's hands (not lost if the process dies) as soon as the
    observer returns, and a line is never split between files.

    Before a line that would take a non-empty file past ``max_bytes`` is
    written, the file is renamed to a backup named
    ``<file>.<UTC time stamp>.<sequence>``, for example
    ``llmproxy.log.20261126T103700.123456Z.0001``, and a fresh file is
    opened. Backups sort by age even if the wall clock steps back, because
    a new name never sorts before the newest existing one. With
    ``compress`` a thread-pool job gzips each backup to ``<backup>.gz``
    (through ``<backup>.gz.tmp``, renamed when complete); jobs run one at a
    time. After each job, or right after the rotation without
    ``compress``, the oldest backups beyond ``backups`` are deleted.

    Backups left uncompressed, or half-compressed ``.gz.tmp`` files, by an
    earlier process that died are dealt with on construction.

    The observer is thread-safe and never raises: an event that cannot be
    serialised is still written as a line (see :func:`event_line`), and an
    I/O error drops the line and counts it in :attr:`dropped`; the first
    error of a run of them is reported on the process's original stderr
    (logging it would come back here).

    Attributes:
        path: The absolute path of the live file.
        max_bytes: The size a file may not grow past (unless it holds a
            single longer line).
        backups: How many backups are kept.
        compress: Whether backups are gzipped.
        dropped: Lines lost to I/O errors or written after :meth:`close`.
    """

    def __init__(
        self,
        path: str,
        *,
        max_bytes: int = 100 * 1024 * 1024,
        backups: int = 20,
        compress: bool = True,
        reactor: Any,
        compressor: Callable[[str, str], None] = gzip_file,
        now: Callable[[], float] = time.time,
    ) -> None:
        """Create the folder if needed and open the file for appending.

        Args:
            path: The live log file.
            max_bytes: Rotate before the file would grow past this size.
            backups: Rotated files to keep (0 keeps none).
            compress: Gzip rotated files in the reactor's thread pool.
            reactor: Provides ``callFromThread`` (the way back to the
                reactor thread) and ``getThreadPool`` (where compression
                jobs run: anything with ThreadPool's
                ``callInThreadWithCallback``, so a test can run them when
                it chooses); used only with ``compress``, and then
                compression needs a running reactor (or whatever runs
                those calls).
            compressor: Compresses ``source`` to ``target`` (blocking); runs
                in the thread pool.
            now: The wall clock used for backup names.

        Raises:
            ValueError: ``max_bytes`` is below 1 or ``backups`` below 0.
            OSError: The folder cannot be created or the file opened.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes!r}")
        if backups < 0:
            raise ValueError(f"backups must be at least 0, not {backups!r}")
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.compress = compress
        self.dropped = 0
        self._compressor = compressor
        self._lock = threading.Lock()
        # The thread inside __call__'s write, and lines logged re-entrantly
        # by that thread (a signal handler that logs while we write).
        self._owner: int | None = None
        self._reentered: list[bytes] = []
        self._fd: int | None = None
        self._size = 0
        self._closed = False
        self._torn = False
        self._write_failing = False
        self._rotate_failing = False
        self._jobs = CompressionQueue(
            reactor, self._compress_and_prune, max(backups, 1)
        )

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._open()
        self._files = Backups(self.path, now)
        self._files.prune(backups)
        if compress:
            self._jobs.add(self._files.recover())

    # -- the observer ------------------------------------------------------

    def __call__(self, event: LogEvent) -> None:
        """Write ``event`` as one line, rotating first if needed.

        Args:
            event: A log event.
        """
        if self._owner == threading.get_ident():
            # Re-entered on the thread that is writing: a signal handler (such
            # as Twisted's SIGINT one) logged in the middle of a write. Taking
            # the lock would deadlock and writing now would split the line
            # being written, so the line waits for the outer call.
            self._reentered.append(event_line(event))
            return
        try:
            line = event_line(event)
            rotated: list[str] = []
            error: OSError | None = None
            recovered = report = False
            with self._lock:
                if self._closed:
                    self.dropped += 1
                    return
                self._owner = threading.get_ident()
                try:
                    self._write(line, rotated)
                    while self._reentered:
                        self._write(self._reentered.pop(0), rotated)
                except OSError as e:
                    self.dropped += 1
                    error = e
                    report, self._write_failing = not self._write_failing, True
                else:
                    recovered, self._write_failing = self._write_failing, False
                finally:
                    self._owner = None
            if error is not None and report:
                self._warn(f"cannot write log file {self.path}: {safe_repr(error)}")
            elif recovered:
                self._warn(f"log file {self.path} is writable again")
            for backup in rotated:
                self._rotated(backup)
        except Exception as e:  # never raise: the publisher would drop us
            self._warn(f"log observer error: {safe_repr(e)}")

    def _write(self, line: bytes, rotated: list[str]) -> None:
        """Write ``line``, rotating first if needed; called with the lock.

        Args:
            line: A whole line.
            rotated: Receives the path of the backup if this rotates, even
                when writing then fails.

        Raises:
            OSError: The file could not be reopened or written.
        """
        if (
            self._fd is not None
            and self._size
            and (self._size + len(line) > self.max_bytes)
        ):
            backup = self._rotate()
            if backup is not None:
                rotated.append(backup)
        if self._fd is None:
            self._open()
        assert self._fd is not None
        if self._torn:
            # An earlier write failed halfway: end that line so this one
            # stays whole and parseable.
            line = b"\n" + line
        view = memoryview(line)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError:
                self._torn = self._torn or len(view) < len(line)
                # Reopen on the next event: the descriptor may be the problem.
                fd, self._fd = self._fd, None
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise
            self._size += written
            view = view[written:]
        self._torn = False

    def _open(self) -> None:
        """Open the live file for appending and learn its size."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o666)
        try:
            self._size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _rotate(self) -> str | None:
        """Close the live file and rename it to a new backup name.

        Called with the lock. The caller reopens the live file.

        Returns:
            The backup's full path, or None if the rename failed (writing
            then goes on in the old file).
        """
        assert self._fd is not None
        fd, self._fd = self._fd, None
        os.close(fd)
        try:
            backup = self._files.rename_live()
        except OSError as e:
            if not self._rotate_failing:
                self._rotate_failing = True
                self._warn(f"cannot rotate log file {self.path}: {safe_repr(e)}")
            return None
        self._rotate_failing = False
        self._torn = False
        return backup

    def _rotated(self, backup: str) -> None:
        """Compress or prune after a rotation (any thread, no lock held).

        Args:
            backup: The new backup's path.
        """
        if not self.compress:
            self._files.prune(self.backups)
            return
        self._jobs.add([backup])

    def _warn(self, message: str) -> None:
        """Tell the operator about a problem with the log file itself.

        Goes to the process's original stderr: logging it would come back
        here.

        Args:
            message: What happened.
        """
        stream = sys.__stderr__
        if stream is None:
            return
        try:
            stream.write(f"llmproxy.logs: {message}\n")
            stream.flush()
        except Exception:
            pass

    # -- compression -------------------------------------------------------

    def _compress_and_prune(self, backup: str) -> None:
        """Gzip one backup, then prune; runs in the thread pool.

        Args:
            backup: The uncompressed backup. If pruning has deleted it
                meanwhile, there is nothing to compress.
        """
        self._files.compress(backup, self._compressor)
        self._files.prune(self.backups)

    # -- closing -----------------------------------------------------------

    def close(self) -> Deferred[None]:
        """Close the live file; later events are dropped.

        Call it on the reactor thread.

        Returns:
            A Deferred that fires when pending compression jobs are done.
        """
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as e:
                self._warn(f"cannot close log file {self.path}: {safe_repr(e)}")
        if not self.compress:
            return succeed(None)
        return self._jobs.drained()
