"""The stream scenarios: ``streams``, ``streams-fast`` and ``idle``.

They run the stream load generator, :mod:`llmproxy.bench._streamload`, in
its own process: straight to the upstream, through the proxy and (when
nginx is installed) through nginx as a plain streaming proxy, the
reference for the proxy's CPU; ``idle`` holds 1,000 connections open and
reads what they cost the proxy in RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmproxy.bench._process import (
    _child_env,
    _free_port,
    _peak_rss_mb,
    _pin,
    _rss_mb,
    _stop,
    _wait_listening,
    cpu_seconds,
)
from llmproxy.bench._report import _medians, _stream_summary
from llmproxy.bench._servers import _nginx, _start_nginx_proxy, _start_proxy, _start_upstream


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
