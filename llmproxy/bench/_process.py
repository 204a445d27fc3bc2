"""The bench's child processes and what it measures of them.

Starting, pinning (``taskset``), waiting for and stopping children; a free
loopback port; a process's CPU seconds and memory from ``/proc``; the raised
open-file limit; the interpreter every child runs on. Blocking by design:
the bench is a command-line tool, never imported by the daemon.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(
    port: int, process: subprocess.Popen, log: Path, seconds: float = 20.0
) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"bench: a child process exited early (status {process.returncode}):\n"
                + log.read_text(errors="replace")[-2000:]
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # a CLI tool waiting for a child process
    raise SystemExit(f"bench: nothing listens on port {port} after {seconds:g} s")


def _pin(core: int | None) -> list[str]:
    """A taskset prefix pinning a command to one core, if possible."""
    if core is None or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(core)]


@contextlib.contextmanager
def _pinned(core: int | None) -> Iterator[None]:
    """Run the calling thread, and the threads it starts meanwhile, on one
    core (Linux: the affinity is a thread's, inherited by new threads)."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _child_env() -> dict[str, str]:
    """The environment of child processes: no proxies, this llmproxy."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    # The children run the same llmproxy as this process, installed or not:
    # the folder holding llmproxy/ (this file is llmproxy/bench/_process.py).
    source = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    return env


def _start(argv: list[str], cwd: str, log: Path) -> subprocess.Popen:
    env = _child_env()
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds a process used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _memory_mb(pid: int, field: str) -> float:
    """A process's memory figure from /proc (VmRSS now, VmHWM at peak), MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb(pid: int) -> float:
    return _memory_mb(pid, "VmHWM")


def _rss_mb(pid: int) -> float:
    return _memory_mb(pid, "VmRSS")


def _reset_peak_rss(pid: int) -> bool:
    """Start a process's VmHWM afresh from its VmRSS (Linux 4.0 and later:
    ``5`` to ``/proc/PID/clear_refs``); False when that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _raise_open_file_limit() -> None:
    """Raise this process's soft open-file limit as the daemon does (its
    children inherit it): 1,000 streams hold over 2,000 descriptors in the
    proxy, and nginx as one process keeps the limit it is given."""
    from llmproxy.daemon import raise_open_file_limit

    try:
        raise_open_file_limit()
    except (ImportError, OSError, ValueError):
        pass  # the runs report what they get


def _interpreter() -> dict[str, Any]:
    """The Python that runs the proxy (and every other child): the bench's own.

    Whether ``libpython`` is a shared library is read from this process's
    memory map: a shared-library build without PGO (pyenv's default) runs
    the proxy with about a third more CPU than Debian's ``/usr/bin/python3``
    (linked statically, built with PGO and LTO). See the README.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            shared = any("libpython" in line for line in maps)
    except OSError:  # not Linux
        shared = None
    return {
        "version": sys.version.split()[0],
        "executable": os.path.realpath(sys.executable),
        "libpython_shared": shared,
    }
