"""Tests for llmproxy.logs: the rotating JSON file, filters and services."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    eventFromJSON,
    eventsFromJSONLogFile,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llmproxy.logs import (
    LogService,
    RotatingJSONLog,
    console_observer,
    console_observer_factory,
    event_line,
    file_log_service,
    gzip_file,
    level_filtered,
)

#: Seconds any wait may take.
WAIT = 10

T = TypeVar("T")


def _backups(folder: Path, base: str = "llmproxy.log") -> list[Path]:
    """The backups of ``base`` in ``folder``, oldest first.

    Args:
        folder: The log folder.
        base: The live file's name.

    Returns:
        Backup paths (plain or gzipped), sorted by name.
    """
    return sorted(p for p in folder.iterdir() if p.name.startswith(base + "."))


def _read(path: Path) -> bytes:
    """A log file's bytes, gunzipped if it is a ``.gz``.

    Args:
        path: A live file or backup.

    Returns:
        The uncompressed content.
    """
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _ids(data: bytes) -> list[int]:
    """The ``id`` fields of the JSON lines in ``data``, in order.

    Args:
        data: Whole JSON lines.

    Returns:
        One id per line; every line must parse.
    """
    assert data == b"" or data.endswith(b"\n")
    return [eventFromJSON(line)["id"] for line in data.decode().splitlines()]


def _all_ids(folder: Path, base: str = "llmproxy.log") -> list[int]:
    """Ids across the backups (oldest first) and then the live file.

    Args:
        folder: The log folder.
        base: The live file's name.

    Returns:
        Every id, in file order.
    """
    ids: list[int] = []
    for backup in _backups(folder, base):
        ids.extend(_ids(_read(backup)))
    ids.extend(_ids((folder / base).read_bytes()))
    return ids


def _event(i: int, payload: str = "", level: LogLevel = LogLevel.info) -> dict:
    """A log event carrying an id and a payload.

    Args:
        i: The id.
        payload: Padding text.
        level: The event's level.

    Returns:
        The event.
    """
    return {
        "log_format": "event {id} {payload}",
        "log_level": level,
        "log_namespace": "tests.logs",
        "log_time": 1_700_000_000.0 + i,
        "id": i,
        "payload": payload,
    }


def _result(d: Deferred[T]) -> T:
    """The result of a Deferred that must have fired, checked synchronously.

    Args:
        d: A Deferred.

    Returns:
        Its result.

    Raises:
        AssertionError: It has not fired, or it failed.
    """
    results: list[T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    assert not failures, failures[0].getTraceback()
    assert results, "the Deferred has not fired"
    return results[0]


class _HandDrivenPool:
    """A thread pool whose jobs wait until the test runs them.

    Has the one method ``deferToThreadPool`` calls,
    ``callInThreadWithCallback``; :meth:`run_job` runs the oldest queued
    job on the caller's thread.

    Attributes:
        reactor: Where results go, as a pool thread would send them.
        jobs: Queued jobs, oldest first: each a result callback, a
            function and its arguments.
        most_jobs: The most jobs ever queued at once.
        jobs_run: How many jobs have run.
    """

    def __init__(self, reactor: IReactorFromThreads) -> None:
        """Start with no jobs.

        Args:
            reactor: Receives each job's result through ``callFromThread``.
        """
        self.reactor = reactor
        self.jobs: list[tuple[Callable[[bool, Any], None], Callable[..., Any], tuple, dict]] = []
        self.most_jobs = 0
        self.jobs_run = 0

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], None],
        func: Callable[..., Any],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Queue ``func(*args, **kwargs)``; ``onResult`` gets its outcome.

        Args:
            onResult: Called with ``(True, result)`` or ``(False, failure)``.
            func: The job.
            *args: Its positional arguments.
            **kwargs: Its keyword arguments.
        """
        self.jobs.append((onResult, func, args, kwargs))
        self.most_jobs = max(self.most_jobs, len(self.jobs))

    def run_job(self) -> bool:
        """Run the oldest queued job, as a pool thread would.

        Returns:
            Whether there was a job to run.
        """
        if not self.jobs:
            return False
        onResult, func, args, kwargs = self.jobs.pop(0)
        self.jobs_run += 1
        try:
            result = func(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)
        return True


@implementer(IReactorFromThreads)
class _HandDrivenThreads:
    """A reactor's thread side, run by hand: the observer's ``reactor``.

    ``callFromThread`` queues calls and :attr:`pool` queues jobs; nothing
    runs until the test says, so a test chooses exactly when compression
    jobs start and finish between writes.

    Attributes:
        calls: Calls queued by ``callFromThread``, oldest first.
        pool: The thread pool ``getThreadPool`` returns.
    """

    def __init__(self) -> None:
        """Start with nothing queued."""
        self.calls: list[tuple[Callable[..., object], tuple, dict]] = []
        self.pool = _HandDrivenPool(self)

    def callFromThread(self, f: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Queue ``f(*args, **kwargs)`` for :meth:`run_calls`.

        Args:
            f: The call.
            *args: Its positional arguments.
            **kwargs: Its keyword arguments.
        """
        self.calls.append((f, args, kwargs))

    def getThreadPool(self) -> _HandDrivenPool:
        """The pool the observer's compression jobs go to.

        Returns:
            :attr:`pool`.
        """
        return self.pool

    def run_calls(self) -> None:
        """Run the queued calls, and those they queue, as the reactor would."""
        while self.calls:
            f, args, kwargs = self.calls.pop(0)
            f(*args, **kwargs)

    def step(self) -> bool:
        """Start what is due, run one job, and hand its result back.

        Returns:
            Whether a job ran.
        """
        self.run_calls()
        ran = self.pool.run_job()
        self.run_calls()
        return ran

    def run_all(self) -> None:
        """Step until no call and no job is left."""
        while self.step():
            pass


def test_provides_ilogobserver(tmp_path: Path) -> None:
    """RotatingJSONLog declares and implements ILogObserver."""
    observer = RotatingJSONLog(str(tmp_path / "a.log"), compress=False, reactor=None)
    assert verifyObject(ILogObserver, observer)
    observer.close()


@pytest_twisted.ensureDeferred
async def test_one_json_line_per_event(tmp_path: Path, reactor: Any) -> None:
    """Each event is one JSON line, readable with twisted.logger's readers."""
    path = tmp_path / "llmproxy.log"
    observer = RotatingJSONLog(str(path), reactor=reactor)
    logger = Logger(namespace="tests.logs", observer=observer)
    logger.info("hello {who}", who="world")
    logger.warn("multi\nline {n}", n=2)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        logger.failure("it broke")
    # Flushed before the observer returned: readable without closing.
    lines = path.read_bytes().splitlines()
    await observer.close().addTimeout(WAIT, reactor)

    assert len(lines) == 3
    events = [eventFromJSON(line.decode()) for line in lines]
    assert formatEvent(events[0]) == "hello world"
    assert events[0]["log_level"] == LogLevel.info
    assert events[0]["log_namespace"] == "tests.logs"
    assert formatEvent(events[1]) == "multi\nline 2"
    assert "ZeroDivisionError" in events[2]["log_failure"].getTraceback()
    with path.open() as f:
        read_back = list(eventsFromJSONLogFile(f))
    assert [formatEvent(e) for e in read_back[:2]] == ["hello world", "multi\nline 2"]
    assert len(read_back) == 3


def test_folder_is_created(tmp_path: Path) -> None:
    """A missing folder (several levels deep) is created on construction."""
    path = tmp_path / "a" / "b" / "llmproxy.log"
    observer = RotatingJSONLog(str(path), compress=False, reactor=None)
    observer(_event(1))
    observer.close()
    assert _ids(path.read_bytes()) == [1]


def test_appends_to_existing_file(tmp_path: Path) -> None:
    """An existing live file is appended to and its size counts."""
    path = tmp_path / "llmproxy.log"
    path.write_bytes(event_line(_event(0, "x" * 100)))
    observer = RotatingJSONLog(str(path), max_bytes=150, compress=False, reactor=None)
    observer(_event(1, "y" * 100))
    observer.close()
    assert _all_ids(tmp_path) == [0, 1]
    assert len(_backups(tmp_path)) == 1


def test_unserialisable_events_still_make_lines(tmp_path: Path) -> None:
    """Bad events never raise out of the observer and still produce a line."""

    class Nasty:
        """An object whose str and repr both fail."""

        def __str__(self) -> str:
            raise RuntimeError("no str")

        __repr__ = __str__

    loop: dict = {}
    loop["self"] = loop
    bad_events: list[dict] = [
        {"log_format": "{missing}", "log_level": LogLevel.info, "id": 1},
        {"log_format": "{x}", "x": Nasty(), "id": 2},
        {"log_format": "loop", "loop": loop, "id": 3},
        {"log_format": None, 7: "int key", "id": 4},
        {"log_format": 12, "id": 5},
    ]
    path = tmp_path / "llmproxy.log"
    observer = RotatingJSONLog(str(path), compress=False, reactor=None)
    for event in bad_events:
        observer(event)
    observer.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(bad_events)
    for line in lines:
        eventFromJSON(line.decode())
    assert all(b"\n" not in event_line(e)[:-1] for e in bad_events)
    assert "log_flattened" not in bad_events[0]


def test_hand_driven_threads_provide_ireactorfromthreads() -> None:
    """The tests' fake thread side declares and implements its interface."""
    assert verifyObject(IReactorFromThreads, _HandDrivenThreads())


def test_rotation_under_load_loses_nothing(tmp_path: Path) -> None:
    """Rotating while compressing: every line lands once, whole, in order.

    Compression jobs start and finish between writes, several rotations
    pile up behind a running job, and each job's compressor itself sees
    more events logged (and files rotated) while it works, as other
    threads would log.
    """
    threads = _HandDrivenThreads()
    count = 2000
    written = 0
    rotated_mid_job = 0

    def emit() -> None:
        """Log the next id, until ``count`` are written."""
        nonlocal written
        if written < count:
            observer(_event(written, "p" * (written % 97)))
            written += 1

    def compressor(source: str, target: str) -> None:
        """Gzip while events keep coming (and the live file rotating)."""
        nonlocal rotated_mid_job
        kicks = len(threads.calls)  # a rotation queues one
        emit()
        gzip_file(source, target)
        emit()
        rotated_mid_job += len(threads.calls) > kicks

    observer = RotatingJSONLog(
        str(tmp_path / "llmproxy.log"),
        max_bytes=2000,
        backups=100_000,
        compress=True,
        reactor=threads,
        compressor=compressor,
    )
    for turn in itertools.count(1):
        if written == count:
            break
        emit()
        if turn % 25 == 0:
            # One job finishes and the next starts between writes.
            threads.step()
    assert threads.pool.jobs_run > 50
    assert rotated_mid_job > 10
    assert threads.pool.jobs or threads.calls, "rotations are waiting to be compressed"
    closed = observer.close()
    threads.run_all()
    _result(closed)

    assert _all_ids(tmp_path) == list(range(count))
    backups = _backups(tmp_path)
    assert len(backups) > 50
    assert threads.pool.jobs_run == len(backups)
    assert all(b.name.endswith(".gz") for b in backups)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    for backup in backups:
        assert len(_read(backup)) <= 2000
    assert observer.dropped == 0


def test_backup_count_is_capped(tmp_path: Path) -> None:
    """With backups=3 exactly the three newest backups remain.

    Each compression job prunes when it ends: right after one, at most
    three backups are on disk however many rotations came before it.
    """
    threads = _HandDrivenThreads()
    observer = RotatingJSONLog(
        str(tmp_path / "llmproxy.log"),
        max_bytes=600,
        backups=3,
        compress=True,
        reactor=threads,
    )
    count = 300
    for i in range(count):
        observer(_event(i, "q" * 50))
        if i % 10 == 0 and threads.step():
            assert len(_backups(tmp_path)) <= 3
    assert threads.pool.jobs_run > 10
    closed = observer.close()
    threads.run_all()
    _result(closed)

    backups = _backups(tmp_path)
    assert len(backups) == 3
    assert all(b.name.endswith(".gz") for b in backups)
    ids = _all_ids(tmp_path)
    # The newest ones: what is left is an unbroken run ending at the last id.
    assert ids == list(range(ids[0], count))
    assert len(ids) < count


@pytest_twisted.ensureDeferred
async def test_compress_false_keeps_plain_backups(tmp_path: Path, reactor: Any) -> None:
    """Without compression backups stay plain and are pruned right away."""
    observer = RotatingJSONLog(
        str(tmp_path / "llmproxy.log"),
        max_bytes=500,
        backups=4,
        compress=False,
        reactor=reactor,
    )
    for i in range(100):
        observer(_event(i, "r" * 40))
        assert len(_backups(tmp_path)) <= 4
    d = observer.close()
    assert d.called
    await d
    backups = _backups(tmp_path)
    assert len(backups) == 4
    assert not [b for b in backups if b.name.endswith(".gz")]
    ids = _all_ids(tmp_path)
    assert ids == list(range(ids[0], 100))


def test_compression_jobs_run_one_at_a_time(tmp_path: Path) -> None:
    """However many rotations ask, one job is in the pool at a time.

    The next one starts only when the running one has handed its result
    back, oldest backup first.
    """
    threads = _HandDrivenThreads()
    compressed: list[str] = []

    def compressor(source: str, target: str) -> None:
        """Record the backup, then gzip."""
        compressed.append(os.path.basename(source))
        gzip_file(source, target)

    observer = RotatingJSONLog(
        str(tmp_path / "llmproxy.log"),
        max_bytes=300,
        backups=1000,
        compress=True,
        reactor=threads,
        compressor=compressor,
    )
    for i in range(200):
        observer(_event(i, "s" * 30))
    rotations = len(_backups(tmp_path))
    assert rotations > 20
    threads.run_calls()
    assert len(threads.pool.jobs) == 1
    while threads.pool.run_job():
        assert threads.pool.jobs == []
        threads.run_calls()
        assert len(threads.pool.jobs) <= 1
    closed = observer.close()
    threads.run_all()
    _result(closed)

    assert threads.pool.most_jobs == 1
    assert len(compressed) == rotations == len(_backups(tmp_path))
    assert compressed == sorted(compressed)
    assert _all_ids(tmp_path) == list(range(200))


@pytest_twisted.ensureDeferred
async def test_compression_runs_in_a_pool_thread_while_writing_goes_on(
    tmp_path: Path, reactor: Any
) -> None:
    """On the reactor's real pool: the compressor runs off the reactor thread,
    one job at a time, and logging goes on (rotating) while a job runs."""
    calls: list[tuple[threading.Thread, bool]] = []
    running = 0
    most = 0
    lock = threading.Lock()
    started: Deferred[None] = Deferred()
    gate = threading.Event()

    def compressor(source: str, target: str) -> None:
        """Record the thread and the concurrency; hold the first job; gzip."""
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            first = not calls
            calls.append((threading.current_thread(), isInIOThread()))
        try:
            if first:
                reactor.callFromThread(started.callback, None)
                gate.wait(WAIT)
            gzip_file(source, target)
        finally:
            with lock:
                running -= 1

    observer = RotatingJSONLog(
        str(tmp_path / "llmproxy.log"),
        max_bytes=300,
        backups=1000,
        compress=True,
        reactor=reactor,
        compressor=compressor,
    )
    try:
        for i in range(10):
            observer(_event(i, "s" * 30))
        await started.addTimeout(WAIT, reactor)
        # The first job is running in a pool thread: writing goes on.
        before = len(_backups(tmp_path))
        for i in range(10, 200):
            observer(_event(i, "s" * 30))
        assert len(_backups(tmp_path)) > before + 20
        assert len(calls) == 1
    finally:
        gate.set()
    await observer.close().addTimeout(WAIT, reactor)

    assert isInIOThread()
    assert all(thread is not threading.current_thread() for thread, _ in calls)
    assert not any(in_io for _, in_io in calls)
    assert most == 1
    assert len(calls) == len(_backups(tmp_path))
    assert all(b.name.endswith(".gz") for b in _backups(tmp_path))
    assert _all_ids(tmp_path) == list(range(200))


@pytest.mark.allow_logged_failures
@pytest_twisted.ensureDeferred
async def test_failed_compression_is_logged_and_keeps_backup(
    tmp_path: Path, reactor: Any
) -> None:
    """A failing compressor leaves the plain backup and no .tmp file."""
    failures: list[dict] = []

    def compressor(source: str, target: str) -> None:
        """Write half a file, then fail."""
        Path(target).write_bytes(b"partial")
        raise OSError("disk full")

    observer = RotatingJSONLog(
        str(tmp_path / "llmproxy.log"),
        max_bytes=200,
        compress=True,
        reactor=reactor,
        compressor=compressor,
    )
    globalLogPublisher.addObserver(failures.append)
    try:
        for i in range(5):
            observer(_event(i, "t" * 100))
        await observer.close().addTimeout(WAIT, reactor)
    finally:
        globalLogPublisher.removeObserver(failures.append)
    assert [e for e in failures if "log_failure" in e]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert _all_ids(tmp_path) == list(range(5))


@pytest_twisted.ensureDeferred
async def test_leftovers_of_a_dead_process_are_finished(
    tmp_path: Path, reactor: Any
) -> None:
    """Plain backups get compressed, stale .tmp files go, names keep sorting."""
    old = tmp_path / "llmproxy.log.20300101T000000.000000Z.0007"
    old.write_bytes(event_line(_event(0)))
    stale = tmp_path / "llmproxy.log.20300101T000000.000000Z.0006.gz.tmp"
    stale.write_bytes(b"half")
    # The wall clock is now before the newest backup's stamp.
    observer = RotatingJSONLog(
        str(tmp_path / "llmproxy.log"),
        max_bytes=100,
        compress=True,
        reactor=reactor,
        now=lambda: 0.0,
    )
    observer(_event(1, "u" * 100))
    observer(_event(2, "u" * 100))
    await observer.close().addTimeout(WAIT, reactor)

    names = [b.name for b in _backups(tmp_path)]
    assert names == [
        "llmproxy.log.20300101T000000.000000Z.0007.gz",
        "llmproxy.log.20300101T000000.000000Z.0008.gz",
    ]
    assert not stale.exists()
    assert _all_ids(tmp_path) == [0, 1, 2]


def test_threads_writing_concurrently(tmp_path: Path) -> None:
    """Events from several threads are each written once, whole."""
    observer = RotatingJSONLog(
        str(tmp_path / "llmproxy.log"),
        max_bytes=1500,
        backups=10_000,
        compress=False,
        reactor=None,
    )

    def emit(start: int) -> None:
        """Write 300 events with ids from ``start``."""
        for i in range(start, start + 300):
            observer(_event(i, "v" * (i % 50)))

    threads = [threading.Thread(target=emit, args=(n * 300,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    observer.close()
    assert sorted(_all_ids(tmp_path)) == list(range(1200))


def test_failed_write_is_dropped_and_next_line_stays_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failing halfway drops its line; later lines still parse."""
    path = tmp_path / "llmproxy.log"
    observer = RotatingJSONLog(str(path), compress=False, reactor=None)
    observer(_event(1))
    real_write = os.write
    target = os.fstat(observer._fd).st_ino  # type: ignore[arg-type]

    def torn_write(fd: int, data: Any) -> int:
        """Write half of our line, then fail like a full disk."""
        if os.fstat(fd).st_ino != target:
            return real_write(fd, data)
        if len(data) > 10:
            return real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", torn_write)
        observer(_event(2))  # must not raise
    assert observer.dropped == 1
    observer(_event(3))
    observer.close()
    lines = path.read_bytes().splitlines()
    assert [eventFromJSON(lines[0])["id"], eventFromJSON(lines[-1])["id"]] == [1, 3]
    assert len(lines) == 3


def test_after_close_events_are_dropped(tmp_path: Path) -> None:
    """Events after close are counted as dropped, not written or raised."""
    path = tmp_path / "llmproxy.log"
    observer = RotatingJSONLog(str(path), compress=False, reactor=None)
    observer.close()
    observer(_event(1))
    assert observer.dropped == 1
    assert path.read_bytes() == b""


def test_bad_arguments(tmp_path: Path) -> None:
    """Nonsense sizes and levels fail with a clear ValueError."""
    with pytest.raises(ValueError, match="max_bytes"):
        RotatingJSONLog(str(tmp_path / "a.log"), max_bytes=0, reactor=None)
    with pytest.raises(ValueError, match="backups"):
        RotatingJSONLog(str(tmp_path / "a.log"), backups=-1, reactor=None)
    with pytest.raises(ValueError, match="unknown log level 'verbose'.*debug, info"):
        level_filtered(lambda event: None, "verbose")
    with pytest.raises(ValueError, match="unknown log level"):
        console_observer_factory("INFO!")
    with pytest.raises(ValueError, match="unknown log level"):
        file_log_service(str(tmp_path / "b" / "b.log"), level="loud", reactor=None)
    assert not (tmp_path / "b").exists()


def test_level_filtering() -> None:
    """At info, debug is dropped; info, warn and above pass."""
    seen: list[dict] = []
    observer = level_filtered(seen.append, "info")
    logger = Logger(namespace="tests.logs", observer=observer)
    logger.debug("dropped")
    logger.info("kept info")
    logger.warn("kept warn")
    logger.critical("kept critical")
    assert [e["log_format"] for e in seen] == [
        "kept info",
        "kept warn",
        "kept critical",
    ]

    # Twisted's factory start/stop lines are info events taken as debug.
    seen.clear()
    factory = Logger(namespace="twisted.web.client._HTTP11ClientFactory")
    for level in ("info", "debug"):
        factory.observer = level_filtered(seen.append, level)
        factory.info("Starting factory {factory!r}", factory=object())
        factory.info("Stopping factory {factory!r}", factory=object())
    assert [e["log_level"] for e in seen] == [LogLevel.info] * 2

    seen.clear()
    logger = Logger(
        namespace="tests.logs", observer=level_filtered(seen.append, "error")
    )
    logger.warn("dropped")
    logger.error("kept")
    assert [e["log_format"] for e in seen] == ["kept"]


def test_console_observer() -> None:
    """Console output is readable text, filtered by level."""
    stream = io.StringIO()
    logger = Logger(namespace="tests.logs", observer=console_observer("warn", stream))
    logger.info("quiet {n}", n=1)
    logger.warn("loud {n}", n=2)
    text = stream.getvalue()
    assert "loud 2" in text
    assert "quiet" not in text
    assert "[tests.logs#warn]" in text


def test_console_observer_factory(capsys: pytest.CaptureFixture[str]) -> None:
    """The factory is a zero-argument callable making a stdout observer."""
    make = console_observer_factory("error")
    logger = Logger(namespace="tests.logs", observer=make())
    logger.warn("not shown")
    logger.error("shown {n}", n=3)
    out = capsys.readouterr().out
    assert "shown 3" in out
    assert "not shown" not in out


@pytest_twisted.ensureDeferred
async def test_log_service_adds_and_removes(tmp_path: Path, reactor: Any) -> None:
    """The service observes while running and closes the observer on stop."""
    publisher = LogPublisher()
    path = tmp_path / "llmproxy.log"
    observer = RotatingJSONLog(str(path), max_bytes=300, compress=True, reactor=reactor)
    service = LogService(level_filtered(observer, "info"), publisher, observer.close)
    logger = Logger(namespace="tests.logs", observer=publisher)
    logger.info("before start")
    service.startService()
    assert service.running
    for i in range(20):
        logger.info("event {id} {pad}", id=i, pad="w" * 40)
    logger.debug("event {id}", id=-1)
    await service.stopService().addTimeout(WAIT, reactor)
    logger.info("after stop {id}", id=99)
    assert not service.running
    assert _all_ids(tmp_path) == list(range(20))
    # Stopping waited for compression.
    assert all(b.name.endswith(".gz") for b in _backups(tmp_path))
    assert observer.dropped == 0


def test_log_service_without_close() -> None:
    """Without a close callable, stopService just removes the observer."""
    publisher = LogPublisher()
    seen: list[dict] = []
    service = LogService(seen.append, publisher)
    service.startService()
    publisher({"log_format": "x"})
    assert service.stopService() is None
    publisher({"log_format": "y"})
    assert [e["log_format"] for e in seen] == ["x"]


@pytest_twisted.ensureDeferred
async def test_file_log_service_on_global_publisher(
    tmp_path: Path, reactor: Any
) -> None:
    """file_log_service logs global events at its level to a rotating file."""
    path = tmp_path / "logs" / "llmproxy.log"
    service = file_log_service(
        str(path),
        max_bytes=400,
        backups=2,
        compress=True,
        level="warn",
        reactor=reactor,
    )
    service.startService()
    logger = Logger(namespace="tests.logs")
    try:
        for i in range(30):
            logger.info("info {id}", id=1000 + i)
            logger.warn("warn {id} {pad}", id=i, pad="z" * 40)
    finally:
        await service.stopService().addTimeout(WAIT, reactor)
    ids = [i for i in _all_ids(path.parent) if i < 1000 or i >= 2000]
    assert ids == list(range(ids[0], 30))
    backups = _backups(path.parent)
    assert len(backups) == 2
    assert all(b.name.endswith(".gz") for b in backups)


def _partition(lines: list[bytes], max_bytes: int) -> list[list[bytes]]:
    """The model: how lines should be split into files.

    Args:
        lines: Every line, in order.
        max_bytes: The size limit.

    Returns:
        The lines of each file, oldest first; the last is the live file.
    """
    files: list[list[bytes]] = [[]]
    size = 0
    for line in lines:
        if size and size + len(line) > max_bytes:
            files.append([])
            size = 0
        files[-1].append(line)
        size += len(line)
    return files


@settings(max_examples=150, deadline=None)
@given(
    max_bytes=st.integers(1, 800),
    backups=st.integers(0, 4),
    sizes=st.lists(st.integers(0, 300), max_size=30),
    clock=st.lists(st.floats(0, 4e9), min_size=1, max_size=4),
)
def test_rotation_arithmetic(
    max_bytes: int, backups: int, sizes: list[int], clock: list[float]
) -> None:
    """Files split exactly where the size model says; the newest are kept.

    Runs synchronously (no compression, no reactor), with a wall clock that
    may stand still or step back: backup names must still sort by age.
    """
    events = [_event(i, "x" * n) for i, n in enumerate(sizes)]
    expected = _partition([event_line(e) for e in events], max_bytes)
    ticks = itertools.cycle(clock)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        observer = RotatingJSONLog(
            os.path.join(name, "llmproxy.log"),
            max_bytes=max_bytes,
            backups=backups,
            compress=False,
            reactor=None,
            now=lambda: next(ticks),
        )
        for event in events:
            observer(event)
        observer.close()
        live = (folder / "llmproxy.log").read_bytes()
        kept = [_read(b) for b in _backups(folder)]
    assert live == b"".join(expected[-1])
    rotated = expected[:-1]
    wanted = rotated[len(rotated) - min(backups, len(rotated)) :]
    assert kept == [b"".join(lines) for lines in wanted]
    for lines in expected:
        assert len(lines) == 1 or sum(map(len, lines)) <= max_bytes
    assert observer.dropped == 0


def test_a_signal_handler_logging_mid_write_neither_deadlocks_nor_splits(tmp_path) -> None:
    """An event logged re-entrantly (a signal handler interrupting a write)
    is written after the line in progress, whole, without a deadlock."""
    from twisted.logger import Logger, LogPublisher, eventsFromJSONLogFile

    from llmproxy.logs import RotatingJSONLog

    observer = RotatingJSONLog(str(tmp_path / "l.log"), reactor=None, compress=False)
    publisher = LogPublisher(observer)
    log = Logger(namespace="t", observer=publisher)
    original = observer._write
    interrupted = []

    def write(line: bytes, rotated: list) -> None:
        if not interrupted:
            interrupted.append(True)
            log.info("from the signal handler")  # what a handler would do
        original(line, rotated)

    observer._write = write
    log.info("outer line")
    observer._write = original
    observer.close()
    with open(tmp_path / "l.log") as f:
        texts = [e["log_format"] for e in eventsFromJSONLogFile(f)]
    assert texts == ["outer line", "from the signal handler"]
