"""The bench's scenarios and what drives their load.

``nonstream`` and ``sse`` run ``wrk``; ``streams``, ``streams-fast`` and
``idle`` run the stream load generator, :mod:`llmproxy.bench._streamload`,
in its own process; ``hostile-body`` lives in :mod:`llmproxy.bench._hostile`.
:func:`run` runs the chosen scenario straight to the upstream and through
the proxy (``hostile-body``: through the proxy only) and returns the results;
``nonstream`` and ``sse`` with the ``--limit-store`` rate limit of
:mod:`llmproxy.bench._limitstore`.
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
    _child_env,
    _free_port,
    _interpreter,
    _peak_rss_mb,
    _pin,
    _rss_mb,
    _start,
    _stop,
    _wait_listening,
    core_plan,
    cpu_seconds,
    tree_cpu_seconds,
)
from llmproxy.bench._report import (
    PROXY_OFF,
    PROXY_ON,
    REFERENCE,
    _medians,
    _stream_summary,
    cores_note,
    median_run,
    per_cpu_second,
    reference_ratios,
)
from llmproxy.bench._servers import (
    _nginx,
    _proxy_config,
    _reference_argv,
    _start_nginx_proxy,
    _start_proxy,
    _start_upstream,
)


CHAT = json.dumps(
    {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}]}
)

_LUA = """
wrk.method = "POST"
wrk.body   = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Fake-Chunks"] = "{chunks}"
"""


def _parse_latency(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        return float("nan")
    value, unit = float(match[1]), match[2]
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _wrk(url: str, connections: int, seconds: float, chunks: int, core: Cores,
         workdir: Path) -> dict[str, Any]:
    script = workdir / "post.lua"
    script.write_text(_LUA.format(body=CHAT, chunks=chunks))
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


def _load(argv: list[str], core: int | None, work: Path,
          watch: int | None = None) -> dict[str, Any]:
    """Run the stream load generator in its own process; return its JSON.

    With ``watch`` (the proxy's pid), the result's ``window`` holds that
    process's CPU over the time every stream was open at once.
    """
    out = work / "load.json"
    subprocess.run(
        [*_pin(core), sys.executable, "-m", "llmproxy.bench._streamload", *argv, str(out),
         *([str(watch)] if watch is not None else [])],
        check=True, cwd=str(work), env=_child_env(),
    )
    return json.loads(out.read_text())


def _run_idle(results: dict[str, Any], work: Path, upstream_port: int,
              proxy_core: int | None, other_core: int | None) -> None:
    """1,000 idle client connections: what they cost in RSS."""
    port = _free_port()
    proxy = _start_proxy(work, port, upstream_port, proxy_core)
    try:
        before_rss = _rss_mb(proxy.pid)
        generator = subprocess.Popen(
            [*_pin(other_core), sys.executable, "-m", "llmproxy.bench._streamload", "idle",
             f"http://127.0.0.1:{port}/", "1000", "4", str(work / "idle.json")],
            cwd=str(work), env=_child_env(),
        )
        time.sleep(3)  # the connections are open and idle now
        during_rss = _rss_mb(proxy.pid)
        generator.wait(timeout=60)
        held = json.loads((work / "idle.json").read_text())["open"]
        results["runs"]["proxy, 1000 idle connections"] = {
            "open_connections": held,
            "rss_idle_process_mb": round(before_rss, 1),
            "rss_with_connections_mb": round(during_rss, 1),
            "rss_cost_mb": round(during_rss - before_rss, 1),
        }
    finally:
        _stop(proxy)


#: Streams open at once in ``streams`` and ``streams-fast``.
OPEN_STREAMS = 1000
#: New streams a second the stream generator and the upstream were built
#: for (``streams-fast``'s rate); fewer events per stream ask for more.
MAX_STREAM_RATE = 1000


def _stream_load(scenario: str, chunks: int, duration: float) -> tuple[int, float, int, float]:
    """The stream load: how many streams, started evenly over how many
    seconds, of how many content events how far apart.

    Both scenarios keep about :data:`OPEN_STREAMS` streams open at once:
    with the default 20 events, streams of 10 s (events 500 ms apart) start
    at 100 a second, streams of 1 s (50 ms apart) at 1,000 a second. More
    events per stream make longer streams that start less often, so the
    per-stream work (a connection, a request, a response head, an access
    record) weighs less against the per-event work. Starts are spread over
    at least twice a stream's length, so the second half runs at the full
    concurrency.

    Returns:
        ``(count, spread, chunks, delay)``: the stream generator's arguments.
    """
    delay = 0.05 if scenario == "streams-fast" else 0.5
    length = chunks * delay
    spread = max(2 * length, duration)
    return int(OPEN_STREAMS / length * spread), spread, chunks, delay


def _run_streams(args: argparse.Namespace, results: dict[str, Any], work: Path,
                 proxy_core: int | None, other_core: int | None) -> None:
    """The streams, streams-fast and idle scenarios.

    With ``--repeat N`` the direct run and the proxy run alternate N times
    (a fresh proxy each time); each overhead is against the direct run just
    before it, and the report gives medians and ranges.
    """
    count, spread, chunks, delay = _stream_load(args.scenario, args.chunks, args.duration)
    if args.scenario != "idle":
        results["chunks_per_stream"] = chunks
        results["new_streams_per_s"] = round(count / spread, 1)
        if count / spread > MAX_STREAM_RATE:
            print(f"bench: {count / spread:,.0f} new streams a second is more than the "
                  f"{MAX_STREAM_RATE:,} the load generator and upstream are known to keep up "
                  "with; their own limits may show in the results", file=sys.stderr)
    load = [str(count), str(spread), str(chunks), str(delay)]
    upstream_port = _free_port()
    upstream = _start_upstream(args.scenario, upstream_port, other_core, work, chunks, delay)
    results["upstream"] = "nginx" if "nginx" in str(upstream.args) else "fake upstream"
    try:
        _wait_listening(upstream_port, upstream, work / "upstream.log")
        if args.scenario == "idle":
            _run_idle(results, work, upstream_port, proxy_core, other_core)
            return
        path = "/v1/chat/completions"
        nginx = _nginx() if args.nginx_proxy else None
        directs: list[dict[str, Any]] = []
        proxied: list[dict[str, Any]] = []
        references: list[dict[str, Any]] = []
        for _ in range(max(1, args.repeat)):
            direct = _stream_summary(
                _load([f"http://127.0.0.1:{upstream_port}{path}", *load], other_core,
                      work)["streams"]
            )
            directs.append(direct)
            port = _free_port()
            proxy = _start_proxy(work, port, upstream_port, proxy_core)
            proxied.append(_proxied_streams(proxy, port, path, load, direct, other_core, work))
            if nginx is not None:
                # The same load through nginx on the same core, right after:
                # what a C proxy costs on this machine at this moment.
                port = _free_port()
                try:
                    proxy = _start_nginx_proxy(nginx, work, port, upstream_port, proxy_core)
                except SystemExit as e:  # it did not start: the rest stands
                    print(f"bench: no nginx reference: {e}", file=sys.stderr)
                    nginx = None
                else:
                    references.append(
                        _proxied_streams(proxy, port, path, load, direct, other_core, work))
        results["runs"]["direct"] = _medians(directs)
        results["runs"]["proxy (logs+metrics on)"] = _medians(proxied)
        if references:
            results["runs"]["nginx as the proxy (access log on)"] = _medians(references)
    finally:
        _stop(upstream)


def _proxied_streams(proxy: subprocess.Popen, port: int, path: str, load: list[str],
                     direct: dict[str, Any], core: int | None, work: Path) -> dict[str, Any]:
    """Drive ``load`` through the running ``proxy`` (stopped after): its
    first bytes against ``direct``'s, its CPU and peak RSS."""
    try:
        cpu_before, wall_before = cpu_seconds(proxy.pid), time.monotonic()
        loaded = _load([f"http://127.0.0.1:{port}{path}", *load], core, work, watch=proxy.pid)
        wall = time.monotonic() - wall_before
        cpu = cpu_seconds(proxy.pid) - cpu_before
        summary = _stream_summary(loaded["streams"])
        # The target's load is 1,000 streams open at once: the CPU over the
        # window when they all are. The whole run's average (ramp-up and
        # ramp-down included) is about two thirds of that for `streams`; it
        # is kept for comparison. (The spread is at least twice a stream's
        # length, so the window exists.)
        window = loaded["window"] or {"cpu_seconds": cpu, "seconds": wall}
        summary["proxy_cpu_percent"] = round(100 * window["cpu_seconds"] / window["seconds"], 1)
        summary["proxy_cpu_percent_whole_run"] = round(100 * cpu / wall, 1)
        summary["proxy_peak_rss_mb"] = round(_peak_rss_mb(proxy.pid), 1)
    finally:
        _stop(proxy)
    for q in ("p50", "p99"):
        summary[f"ttfb_overhead_{q}_ms"] = round(summary[f"ttfb_{q}_ms"] - direct[f"ttfb_{q}_ms"], 2)
    return summary


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
    extra = limit_config(args.limit_store, redis["port"] if redis else None)
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
                scripts = await_store(store["port"], port, path, CHAT, log)
                commands = _redis_counts(store["port"])[1]
            cpu_before, wall_before = tree_cpu_seconds(pids), time.monotonic()
            run_result = _wrk(f"http://127.0.0.1:{port}{path}", args.connections,
                              args.duration, chunks, other_core, work)
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
