"""The bench's scenarios: :func:`run`, and the wrk scenarios.

``nonstream`` and ``sse`` run ``wrk`` straight to the upstream, then
through the proxy (logs and metrics on and off, with the ``--limit-store``
rate limit of :mod:`llmproxy.bench._limitstore`) and through the
twisted.web + Agent reference proxy of :mod:`llmproxy.bench._reference`;
``streams``, ``streams-fast`` and ``idle`` live in
:mod:`llmproxy.bench._streams`, ``hostile-body`` in
:mod:`llmproxy.bench._hostile`. :func:`run` runs the chosen scenario and
returns the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmproxy.bench._hostile import _run_hostile
from llmproxy.bench._limitstore import (
    BUDGET_KEY,
    _redis_counts,
    await_store,
    check_seen,
    limit_config,
    local_redis,
    redis_server,
    seen_summary,
)
from llmproxy.bench._process import (
    Cores,
    _await_workers,
    _free_port,
    _interpreter,
    _peak_rss_mb,
    _pin,
    _start,
    _stop,
    _wait_listening,
    core_plan,
    tree_cpu_seconds,
)
from llmproxy.bench._report import (
    PROXY_OFF,
    PROXY_ON,
    REFERENCE,
    cores_note,
    median_run,
    per_cpu_second,
    reference_ratios,
)
from llmproxy.bench._servers import _proxy_config, _reference_argv, _start_upstream
from llmproxy.bench._streams import _run_streams


CHAT = json.dumps(
    {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}]}
)

_LUA = """
wrk.method = "POST"
wrk.body   = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Fake-Chunks"] = "{chunks}"
{auth}"""


def _parse_latency(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        return float("nan")
    value, unit = float(match[1]), match[2]
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _wrk(url: str, connections: int, seconds: float, chunks: int, core: Cores,
         workdir: Path, budget: bool = False) -> dict[str, Any]:
    script = workdir / "post.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {BUDGET_KEY}"\n' if budget else ""
    script.write_text(_LUA.format(body=CHAT, chunks=chunks, auth=auth))
    argv = [*_pin(core), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
            "--latency", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    requests = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": float(rate[1]) if rate else 0.0,
        "requests": int(requests[1]) if requests else 0,
        "p50_ms": _parse_latency(latency.get("50", "")),
        "p90_ms": _parse_latency(latency.get("90", "")),
        "p99_ms": _parse_latency(latency.get("99", "")),
        "errors": int(errors[1]) if errors else 0,
        "socket_errors": socket_errors[1] if socket_errors else "",
    }


def _wrk_proxy_runs(args: argparse.Namespace, results: dict[str, Any], work: Path,
                    upstream_port: int, chunks: int, proxy_core: Cores,
                    other_core: Cores, redis: dict[str, Any] | None,
                    reference: bool) -> None:
    """wrk through the proxy, logs and metrics on and off, and (with
    ``reference``) through the twisted.web + Agent reference proxy, one
    after another, ``--repeat`` times each, the proxy with the
    ``--limit-store`` rate limit and ``--workers`` processes.

    Each run starts once the proxy's processes are all up and idle; its
    CPU, peak RSS and requests per CPU-second are summed over them. The
    reference runs as one process on the proxy's cores.

    With ``redis`` (the local Redis's port and version), each proxy run
    starts once the proxy's store connection is up, records the scripts and
    commands Redis ran during it, and fails unless Redis ran a script for
    about every request; ``results["redis"]`` sums them up.
    """
    path = "/v1/chat/completions"
    extra = limit_config(args.limit_store, redis["port"] if redis else None, args.budget)
    variants: list[tuple[str, bool | None]] = [(PROXY_ON, True), (PROXY_OFF, False)]
    if reference:
        variants.append((REFERENCE, None))
    proxied: list[dict[str, Any]] = []
    for name, observability in variants * args.repeat:
        port = _free_port()
        if observability is None:
            log, processes = work / "reference.log", 1
            argv = _reference_argv(port, upstream_port, proxy_core)
        else:
            log, processes = work / "proxy.log", args.workers
            config = work / f"{observability}.yml"
            _proxy_config(config, port, upstream_port, observability, extra, args.workers)
            argv = [*_pin(proxy_core), sys.executable, "-c",
                    "from twisted.scripts.twistd import run; run()",
                    "-n", "--pidfile=", "llmproxy", "--config", str(config)]
        store = redis if observability is not None else None
        proxy = _start(argv, str(work), log)
        try:
            _wait_listening(port, proxy, log)
            pids = _await_workers(proxy, processes, log)
            scripts = commands = 0
            if store:
                scripts = await_store(store["port"], port, path, CHAT, log,
                                      budget=args.budget)
                commands = _redis_counts(store["port"])[1]
            cpu_before, wall_before = tree_cpu_seconds(pids), time.monotonic()
            run_result = _wrk(f"http://127.0.0.1:{port}{path}", args.connections,
                              args.duration, chunks, other_core, work, args.budget)
            cpu = tree_cpu_seconds(pids) - cpu_before
            # The CPU over the time it was measured in (wrk's start and end
            # included), not over --duration: a proxy pinned to one core
            # then never shows more than 100 %.
            wall = time.monotonic() - wall_before
            if cpu != cpu:  # NaN: a process ended, its CPU is lost
                raise SystemExit(f"bench: one of the processes of the {name} run ended "
                                 "during it; its log ends:\n"
                                 + log.read_text(errors="replace")[-2000:])
            run_result["proxy_processes"] = len(pids)
            run_result["proxy_cpu_seconds"] = round(cpu, 2)
            run_result["measured_seconds"] = round(wall, 2)
            run_result["proxy_cpu_percent"] = round(100 * cpu / wall, 1)
            run_result["proxy_peak_rss_mb"] = round(sum(map(_peak_rss_mb, pids)), 1)
            run_result["requests_per_proxy_cpu_second"] = per_cpu_second(
                run_result["requests_per_s"], cpu, wall)
            if store:
                now_scripts, now_commands = _redis_counts(store["port"])
                run_result["redis_scripts"] = now_scripts - scripts
                run_result["redis_commands"] = now_commands - commands
                check_seen(run_result["requests"], run_result["redis_scripts"])
                proxied.append(run_result)
            results["runs"].setdefault(name, []).append(run_result)
        finally:
            _stop(proxy)
    if redis:
        results["redis"] = seen_summary(redis, proxied)


def reference_skipped(wanted: bool, workers: int) -> str | None:
    """Why ``nonstream`` and ``sse`` make no reference run, or None.

    Args:
        wanted: Not ``--no-reference``.
        workers: ``--workers``: the reference is one process, so against
            several workers its ratio would measure the worker count, not
            the proxy.
    """
    if not wanted:
        return "--no-reference"
    if workers != 1:
        return f"it is one process and the proxy ran {workers} (compare with --workers 1)"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return its results."""
    cores = os.cpu_count() or 1
    proxy_core, other_core = (0, 1) if cores >= 2 else (None, None)
    if args.scenario == "hostile-body":  # its own load, no wrk
        with tempfile.TemporaryDirectory(prefix="llmproxy-bench-") as tmp:
            return _run_hostile(args, Path(tmp), proxy_core, other_core, CHAT)
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")
    chunks = 20 if args.scenario == "sse" else 1
    path = "/v1/chat/completions"
    results: dict[str, Any] = {
        "scenario": args.scenario,
        "connections": args.connections,
        "seconds": args.duration,
        "pinned": proxy_core is not None,
        "python": _interpreter(),
        "runs": {},
    }
    if args.scenario in ("streams", "streams-fast", "idle"):
        with tempfile.TemporaryDirectory(prefix="llmproxy-bench-") as tmp:
            _run_streams(args, results, Path(tmp), proxy_core, other_core)
        return results
    if args.limit_store == "redis" and redis_server() is None:
        raise SystemExit("bench: redis-server is not installed (apt-get install redis-server)")
    results["limit_store"] = args.limit_store
    results["budget"] = args.budget
    # --workers: the proxy on cores 0..N-1, the load on the rest; with no
    # core left for the load nothing is pinned, and the report says so.
    proxy_core, other_core = core_plan(cores, args.workers)
    note = cores_note(cores, args.workers)
    results.update(workers=args.workers, cores=cores, pinned=proxy_core is not None,
                   proxy_cores=proxy_core, load_cores=other_core,
                   per_cpu_comparable=note is None, cores_note=note)
    skipped = reference_skipped(args.reference, args.workers)
    if skipped:
        results["reference"] = {"skipped": skipped}
    with tempfile.TemporaryDirectory(prefix="llmproxy-bench-") as tmp:
        work = Path(tmp)
        upstream_port = _free_port()
        upstream = _start_upstream(args.scenario, upstream_port, other_core, work)
        results["upstream"] = "nginx" if "nginx" in str(upstream.args) else "fake upstream"
        try:
            _wait_listening(upstream_port, upstream, work / "upstream.log")
            results["runs"]["direct"] = _wrk(
                f"http://127.0.0.1:{upstream_port}{path}", args.connections,
                args.duration, chunks, other_core, work,
            )
            # Redis runs beside the load and is stopped at the end, also on errors.
            store = (local_redis(work, other_core) if args.limit_store == "redis"
                     else contextlib.nullcontext())
            with store as redis:
                _wrk_proxy_runs(args, results, work, upstream_port, chunks, proxy_core,
                                other_core, redis, not skipped)
        finally:
            _stop(upstream)
    # Runs alternate on/off/reference; each variant reports its median run
    # by req/s, and the proxy's against the reference's as ratios.
    runs = results["runs"]
    if not skipped:
        results["reference"] = {"run": REFERENCE, "ratios": reference_ratios(runs)}
    for name in (PROXY_ON, PROXY_OFF, REFERENCE):
        if name in runs:
            runs[name] = median_run(runs[name])
    on, off = runs[PROXY_ON]["requests_per_s"], runs[PROXY_OFF]["requests_per_s"]
    results["observability_cost_percent"] = round(100 * (off - on) / off, 1) if off else None
    return results
