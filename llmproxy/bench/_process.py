"""The bench's child processes and what it measures of them.

Starting, pinning (``taskset``), waiting for and stopping children; where
the proxy and the load run (``--workers``); a free loopback port; a
process's CPU seconds and memory, and the processes under it, from
``/proc``; the raised open-file limit; the interpreter every child runs on.
Blocking by design: the bench is a command-line tool, never imported by the
daemon.
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


#: Where a child runs: one core, a taskset CPU list (``"0-1"``), or None
#: (anywhere).
Cores = int | str | None


def _pin(cores: Cores) -> list[str]:
    """A taskset prefix pinning a command to a core or a CPU list, if possible."""
    if cores is None or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(cores)]


def _cpu_list(first: int, last: int) -> str:
    """A taskset CPU list: ``"2"`` or ``"2-3"``."""
    return str(first) if first == last else f"{first}-{last}"


def core_plan(cores: int, workers: int) -> tuple[str | None, str | None]:
    """Where ``workers`` proxy processes and the load run on ``cores`` cores.

    Args:
        cores: The machine's cores (``os.cpu_count()``).
        workers: The proxy's processes (``--workers``).

    Returns:
        ``(proxy, load)`` taskset CPU lists: the proxy on cores
        0..workers-1, the load generator and upstream on the rest; both
        None (nothing pinned) when no core is left for the load.
    """
    if cores < workers + 1:
        return None, None
    return _cpu_list(0, workers - 1), _cpu_list(workers, cores - 1)


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
        fields = _stat_fields(pid, Path("/proc"))
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _stat_fields(pid: int, proc: Path) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command's name (state first)."""
    return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """A process's children: from ``/proc/PID/task/*/children`` where the
    kernel has those files, else by each process's parent in ``/proc``."""
    listed = list((proc / str(pid) / "task").glob("*/children"))
    if listed:
        found: set[int] = set()
        for path in listed:
            with contextlib.suppress(OSError, ValueError):  # the thread ended
                found.update(int(child) for child in path.read_text().split())
        return sorted(found)
    children = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone
            if int(_stat_fields(int(entry.name), proc)[1]) == pid:
                children.append(int(entry.name))
    return sorted(children)


def process_tree(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """A process and every process under it (the proxy: twistd, then its
    workers), parents before their children."""
    tree, index = [pid], 0
    while index < len(tree):
        tree += [child for child in _children(tree[index], proc) if child not in tree]
        index += 1
    return tree


def tree_cpu_seconds(pids: list[int]) -> float:
    """User+system CPU seconds the processes used so far, summed (NaN when
    one is gone)."""
    return sum(cpu_seconds(pid) for pid in pids)


def _await_workers(process: subprocess.Popen, workers: int, log: Path,
                   seconds: float = 30.0, step: float = 0.25) -> list[int]:
    """Wait until the proxy runs ``workers`` processes that all went idle
    (started, imports done: under two clock ticks of CPU in ``step``).

    Returns:
        Their pids, the first process's first.

    Raises:
        SystemExit: The proxy exited, or did not settle in ``seconds``.
    """
    deadline = time.monotonic() + seconds
    last: tuple[list[int], float] | None = None
    pids: list[int] = []
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"bench: the proxy exited early (status {process.returncode}):\n"
                + log.read_text(errors="replace")[-2000:]
            )
        pids = process_tree(process.pid)
        cpu = tree_cpu_seconds(pids)
        if (len(pids) == workers and last is not None and last[0] == pids
                and cpu - last[1] < 2 / os.sysconf("SC_CLK_TCK")):
            return pids
        last = (pids, cpu)
        time.sleep(step)  # a CLI tool waiting for the proxy's workers to start
    raise SystemExit(
        f"bench: the proxy runs {len(pids)} processes after {seconds:g} s, not {workers} "
        "idle ones; its log ends:\n" + log.read_text(errors="replace")[-2000:]
    )


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
