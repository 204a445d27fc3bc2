"""The benchmark's ``--workers``: options, config, pinning, per-CPU figures.

Pure tests: no wrk, nginx or proxy is started, and the machine's core count
is passed in rather than read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmproxy import bench
from llmproxy.bench import _cli, _process, _report, _servers
from llmproxy.config import load_config


def test_workers_default_to_one_and_take_one_to_sixty_four() -> None:
    """--workers is 1 unless asked; the wrk scenarios take 1 to 64."""
    assert _cli._parse_args([]).workers == 1
    assert _cli._parse_args(["--scenario", "streams"]).workers == 1
    for scenario in ("nonstream", "sse"):
        for workers in ("1", "2", "64"):
            assert _cli._parse_args(
                ["--scenario", scenario, "--workers", workers]).workers == int(workers)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "expected a whole number from 1 to 64, got '0'"),
    (["--workers", "65"], "expected a whole number from 1 to 64, got '65'"),
    (["--workers", "two"], "expected a whole number from 1 to 64, got 'two'"),
    (["--scenario", "streams", "--workers", "2"],
     "2 workers apply to the nonstream and sse scenarios only, not streams"),
    (["--scenario", "hostile-body", "--workers", "4"],
     "4 workers apply to the nonstream and sse scenarios only, not hostile-body"),
])
def test_wrong_workers_are_a_usage_error(capsys, argv: list[str], message: str) -> None:
    """Out of range, not a number, or for a scenario without wrk: exit 2
    with the reason, before anything starts."""
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    assert "--workers" in (err := capsys.readouterr().err) and message in err


@pytest.mark.parametrize("observability", [True, False])
@pytest.mark.parametrize("workers", [1, 2, 64])
def test_the_proxy_config_names_the_workers(tmp_path, workers: int,
                                            observability: bool) -> None:
    """The config has a ``workers: N`` line the daemon loads as N (1 when
    not given)."""
    path = tmp_path / "proxy.yml"
    _servers._proxy_config(path, 8080, 9090, observability, (), workers)
    assert f"workers: {workers}\n" in path.read_text().splitlines(keepends=True)
    assert load_config(str(path)).workers == workers
    _servers._proxy_config(path, 8080, 9090, observability)
    assert load_config(str(path)).workers == 1


@pytest.mark.parametrize("cores, workers, plan", [
    (2, 1, ("0", "1")),
    (3, 2, ("0-1", "2")),
    (4, 2, ("0-1", "2-3")),
    (8, 1, ("0", "1-7")),
    (65, 64, ("0-63", "64")),
    (2, 2, (None, None)),
    (1, 1, (None, None)),
    (4, 8, (None, None)),
])
def test_the_proxy_gets_the_first_cores_and_the_load_the_rest(
        cores: int, workers: int, plan: tuple[str | None, str | None]) -> None:
    """N workers are pinned to cores 0..N-1 and the load to the others;
    with no core left for the load nothing is pinned."""
    assert _process.core_plan(cores, workers) == plan
    assert _process._pin(plan[0]) in ([], ["taskset", "-c", plan[0]])


def test_too_few_cores_are_named_and_enough_are_not() -> None:
    """Fewer than N + 1 cores: a note saying the per-CPU figures are not
    comparable; otherwise none."""
    assert _report.cores_note(2, 2) == (
        "this machine has 2 cores: 2 proxy workers leave none for the load generator, "
        "so nothing is pinned and the load competes with the proxy for CPU; the "
        "per-CPU figures below are not comparable")
    assert _report.cores_note(1, 1).startswith(
        "this machine has 1 core: 1 proxy worker leaves none for the load generator")
    assert "has 4 cores: 8 proxy workers leave none" in _report.cores_note(4, 8)
    assert _report.cores_note(2, 1) is None
    assert _report.cores_note(3, 2) is None
    assert _report.cores_note(65, 64) is None


def test_requests_per_proxy_cpu_second() -> None:
    """req/s divided by the proxy's CPU-seconds a second; none without CPU."""
    # 8,000 req/s while the proxy's processes used 3 CPU-seconds in 2 s.
    assert _report.per_cpu_second(8000.0, 3.0, 2.0) == pytest.approx(5333.3)
    # One worker at 100 % doing 5,000 req/s: 5,000 a CPU-second.
    assert _report.per_cpu_second(5000.0, 2.0, 2.0) == 5000.0
    for cpu in (0.0, -0.01, math.nan):
        assert _report.per_cpu_second(5000.0, cpu, 2.0) is None
    assert _report.per_cpu_second(5000.0, 1.0, 0.0) is None


def _results(workers: int, cores: int) -> dict:
    """Canned wrk results as :func:`llmproxy.bench.run` returns them."""
    run = {"requests_per_s": 6000.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0,
           "errors": 0, "proxy_cpu_percent": 150.0, "proxy_peak_rss_mb": 80.0,
           "proxy_processes": workers,
           "requests_per_proxy_cpu_second": _report.per_cpu_second(6000.0, 3.0, 2.0)}
    proxy, load = _process.core_plan(cores, workers)
    note = _report.cores_note(cores, workers)
    return {"scenario": "nonstream", "connections": 16, "seconds": 2.0,
            "upstream": "nginx", "python": _process._interpreter(), "limit_store": "none",
            "workers": workers, "cores": cores, "pinned": proxy is not None,
            "proxy_cores": proxy, "load_cores": load, "per_cpu_comparable": note is None,
            "cores_note": note, "observability_cost_percent": 5.0,
            "runs": {"direct": {"requests_per_s": 40000.0, "p50_ms": 0.3, "p90_ms": 0.5,
                                "p99_ms": 0.9, "errors": 0},
                     "proxy (logs+metrics on)": run, "proxy (logs+metrics off)": run}}


def test_report_names_the_workers_their_cores_and_the_per_cpu_figure() -> None:
    """The first line names the workers and where they ran; each proxy run
    gives req/s per proxy CPU-second, the direct run none."""
    lines = _report._report(_results(2, 4)).splitlines()
    assert lines[0].startswith("scenario nonstream, 2 proxy workers, limit store: none")
    assert "proxy pinned to cores 0-1, load to cores 2-3, upstream: nginx" in lines[0]
    assert lines[1].endswith("RSS MB  req/s/CPU-s")
    assert lines[2].startswith("direct") and lines[2].endswith(" -")
    assert lines[3].startswith("proxy (logs+metrics on)") and lines[3].endswith(" 4000")
    assert ("the proxy's 2 processes used together: twistd and 1 worker)"
            in lines[5])
    one = _report._report(_results(1, 2)).splitlines()
    assert one[0].startswith("scenario nonstream, 1 proxy worker, limit store")
    assert "proxy pinned to core 0, load to core 1," in one[0]
    assert one[5].endswith("a second the proxy's one process, twistd, used)")


def test_report_warns_when_no_core_is_left_for_the_load() -> None:
    """With too few cores the line after the first says the per-CPU figures
    are not comparable; the JSON says so too."""
    results = _results(2, 2)
    assert results["per_cpu_comparable"] is False
    lines = _report._report(results).splitlines()
    assert "2 proxy workers" in lines[0] and "nothing pinned (2 cores)" in lines[0]
    assert lines[1] == "note: " + _report.cores_note(2, 2)
    assert all("note" not in line for line in _report._report(_results(2, 3)).splitlines())


def _fake_proc(root: Path, stats: dict[int, int], children: bool) -> Path:
    """A /proc with a stat file per pid (its parent given) and, with
    ``children``, each process's task/PID/children list."""
    for pid, parent in stats.items():
        (root / str(pid) / "task" / str(pid)).mkdir(parents=True)
        (root / str(pid) / "stat").write_text(f"{pid} (py thon) S {parent} 1 1 0\n")
        if children:
            kids = " ".join(str(c) for c, p in stats.items() if p == pid)
            (root / str(pid) / "task" / str(pid) / "children").write_text(kids)
    (root / "self").mkdir()
    return root


@pytest.mark.parametrize("children", [True, False])
def test_the_proxy_tree_is_twistd_and_every_process_under_it(tmp_path,
                                                             children: bool) -> None:
    """twistd's workers (and anything under them) are found from the
    kernel's children lists, or without them from each process's parent."""
    proc = _fake_proc(tmp_path, {1: 0, 100: 1, 101: 100, 102: 100, 103: 102, 200: 1},
                      children)
    assert _process.process_tree(100, proc) == [100, 101, 102, 103]
    assert _process.process_tree(101, proc) == [101]


def test_cpu_summed_over_processes_is_nan_when_one_is_gone() -> None:
    """The proxy's CPU is the sum over its processes; a process gone makes
    it NaN (the run then fails rather than under-count)."""
    assert _process.tree_cpu_seconds([]) == 0
    assert _process.tree_cpu_seconds([os.getpid()]) >= 0
    # Above the kernel's highest pid_max (2**22): no process has it.
    assert math.isnan(_process.tree_cpu_seconds([os.getpid(), 2 ** 22 + 1]))


def test_waiting_for_workers_fails_with_the_proxy_log(tmp_path) -> None:
    """A proxy that exited, or never runs N idle processes, ends the bench
    with its log."""
    log = tmp_path / "proxy.log"
    log.write_text("config error: workers\n")
    exited = SimpleNamespace(poll=lambda: 1, returncode=1, pid=os.getpid())
    with pytest.raises(SystemExit, match="(?s)exited early.*config error: workers"):
        _process._await_workers(exited, 2, log)
    running = SimpleNamespace(poll=lambda: None, pid=os.getpid())
    with pytest.raises(SystemExit, match="(?s)not 64 idle ones.*config error"):
        _process._await_workers(running, 64, log, seconds=0.05, step=0.01)
