"""The backups of a rotating log file: :class:`Backups`.

A backup is the live file renamed to ``<file>.<UTC time stamp>.<sequence>``
(for example ``llmproxy.log.20261126T103700.123456Z.0001``), possibly
gzipped to ``<backup>.gz``. :class:`Backups` names new backups, lists and
prunes the existing ones, compresses one, and cleans up what a process
that died left behind. It does file I/O only; the observer decides when.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable

#: A backup's sort key: its time stamp and its sequence number.
_Key = tuple[str, int]


def _stamp(seconds: float) -> str:
    """The UTC time ``seconds`` as used in backup names.

    Args:
        seconds: A POSIX timestamp.

    Returns:
        A fixed-width string such as ``20261126T103700.123456Z``.
    """
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y%m%dT%H%M%S.%fZ")


def _unlink(path: str) -> None:
    """Delete ``path`` if possible; a failure is ignored.

    Args:
        path: The file to delete.
    """
    try:
        os.unlink(path)
    except OSError:
        pass


class Backups:
    """The backup files of one live log file, in the live file's folder.

    New names sort after every existing backup even if the wall clock steps
    back: a name never sorts before the newest one. :meth:`rename_live` is
    not thread-safe (the caller serialises it); the other methods only read
    fixed state and touch files, so they may run in any thread.

    Attributes:
        path: The absolute path of the live file.
        folder: The folder holding the live file and its backups.
    """

    def __init__(self, path: str, now: Callable[[], float]) -> None:
        """Learn the newest existing backup.

        Args:
            path: The absolute path of the live file.
            now: The wall clock used for backup names.
        """
        self.path = path
        self.folder, self._base = os.path.split(path)
        self._now = now
        self._pattern = re.compile(
            re.escape(self._base) + r"\.(\d{8}T\d{6}\.\d{6}Z)\.(\d+)(\.gz)?"
        )
        found = self.scan()
        self._last: _Key | None = found[-1][0] if found else None

    def rename_live(self) -> str:
        """Rename the live file to a backup name newer than every backup.

        Returns:
            The backup's full path.

        Raises:
            OSError: The rename failed; the live file keeps its name.
        """
        key = self._next_key()
        backup = os.path.join(self.folder, f"{self._base}.{key[0]}.{key[1]:04d}")
        os.rename(self.path, backup)
        self._last = key
        return backup

    def _next_key(self) -> _Key:
        """A backup key sorting after every existing one.

        Returns:
            The current time stamp with sequence 0, or, if the clock has
            not moved past the newest backup, that backup's stamp with the
            next sequence number.
        """
        stamp = _stamp(self._now())
        if self._last is not None and stamp <= self._last[0]:
            return (self._last[0], self._last[1] + 1)
        return (stamp, 0)

    def scan(self) -> list[tuple[_Key, list[str]]]:
        """The backups on disk, oldest first.

        Returns:
            Each backup's key and its file names (the plain and the ``.gz``
            file may both exist for a moment).
        """
        found: dict[_Key, list[str]] = {}
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        for name in names:
            match = self._pattern.fullmatch(name)
            if match:
                key = (match.group(1), int(match.group(2)))
                found.setdefault(key, []).append(name)
        return sorted(found.items())

    def prune(self, keep: int) -> None:
        """Delete the oldest backups beyond ``keep``.

        Args:
            keep: How many backups remain.
        """
        found = self.scan()
        excess = len(found) - keep
        for _key, names in found[: max(excess, 0)]:
            for name in names:
                _unlink(os.path.join(self.folder, name))

    def recover(self) -> list[str]:
        """Delete half-written ``.gz.tmp`` files and list plain backups.

        Both are what a process that died while compressing leaves.

        Returns:
            The full paths of the uncompressed backups, oldest first.
        """
        tmp = re.compile(self._pattern.pattern + r"\.tmp")
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        for name in names:
            if tmp.fullmatch(name):
                _unlink(os.path.join(self.folder, name))
        return [
            os.path.join(self.folder, name)
            for _key, names in self.scan()
            for name in names
            if not name.endswith(".gz")
        ]

    def compress(self, backup: str, compressor: Callable[[str, str], None]) -> None:
        """Gzip one backup to ``<backup>.gz`` and delete the plain file.

        Blocking. The ``.gz`` file appears whole: ``compressor`` writes
        ``<backup>.gz.tmp``, renamed when complete, and deleted if the
        compressor fails.

        Args:
            backup: The uncompressed backup. If pruning has deleted it
                meanwhile, there is nothing to do.
            compressor: Compresses its first argument to its second.

        Raises:
            Exception: What ``compressor`` raised, or an OSError from the
                rename or the deletion; the plain backup is kept.
        """
        target = backup + ".gz"
        if not os.path.exists(backup):
            return
        if not os.path.exists(target):
            tmp = target + ".tmp"
            try:
                compressor(backup, tmp)
                os.replace(tmp, target)
            except BaseException:
                _unlink(tmp)
                raise
        os.unlink(backup)
