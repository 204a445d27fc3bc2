"""A benchmark: ``python -m llmproxy.bench``.

Starts an upstream (nginx when installed: a canned completion, and with
Debian's echo module SSE streams; else the package's fake upstream) and
llmproxy (a real ``twistd`` process), drives load with ``wrk`` (Debian
package ``wrk``) or the stream generator ``llmproxy._streamload``, and
reports requests/s, latency or time to first byte for the same load
straight to the upstream and through the proxy (with logging and metrics
on, and for wrk's scenarios also off). For ``streams`` and
``streams-fast`` the same load also runs through nginx as a plain streaming
proxy when nginx is installed: the CPU a C proxy needs on this machine at
this moment. With two or more cores the proxy is pinned to core 0 and
everything else to core 1. Every child runs on the
bench's own Python, which the report names: the interpreter's build
matters (see the README's Performance section).

This is a command-line tool, not part of the daemon: it blocks, waits on
child processes and is never imported by the proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

CHAT = json.dumps(
    {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}]}
)

_LUA = """
wrk.method = "POST"
wrk.body   = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Fake-Chunks"] = "{chunks}"
"""


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


def _child_env() -> dict[str, str]:
    """The environment of child processes: no proxies, this llmproxy."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    # The children run the same llmproxy as this process, installed or not.
    source = str(Path(__file__).resolve().parent.parent)
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


def _parse_latency(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        return float("nan")
    value, unit = float(match[1]), match[2]
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _wrk(url: str, connections: int, seconds: float, chunks: int, core: int | None,
         workdir: Path) -> dict[str, Any]:
    script = workdir / "post.lua"
    script.write_text(_LUA.format(body=CHAT, chunks=chunks))
    argv = [*_pin(core), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
            "--latency", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": float(rate[1]) if rate else 0.0,
        "p50_ms": _parse_latency(latency.get("50", "")),
        "p90_ms": _parse_latency(latency.get("90", "")),
        "p99_ms": _parse_latency(latency.get("99", "")),
        "errors": int(errors[1]) if errors else 0,
        "socket_errors": socket_errors[1] if socket_errors else "",
    }


_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! " * 40},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 80, "total_tokens": 83},
    }
)

_NGINX = """{modules}
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            {location}
        }}
    }}
}}
"""


#: Debian's echo module (libnginx-mod-http-echo): nginx then streams too.
_ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def _sse_event(delta: dict[str, Any], finish: str | None = None) -> str:
    """One chat.completion.chunk event, as the fake upstream sends them."""
    chunk = {
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\\n\\n"


def _nginx_stream_location(chunks: int, delay: float) -> str:
    """An nginx location streaming an SSE chat completion like the fake
    upstream's: the role event at once, ``chunks`` content events
    ``delay`` seconds apart, the stop event and ``[DONE]``. With a delay
    each event is flushed on its own; without one, nginx sends the events
    as they fill its buffer (as the fake upstream does)."""
    flush = ["echo_flush;"] if delay else []
    lines = ["default_type text/event-stream;", "echo_read_request_body;",
             f"echo -n '{_sse_event({'role': 'assistant', 'content': ''})}';", *flush]
    for _ in range(chunks):
        if delay:
            lines.append(f"echo_sleep {delay};")
        lines += [f"echo -n '{_sse_event({'content': 'Hello! '})}';", *flush]
    lines.append(f"echo -n '{_sse_event({}, 'stop')}data: [DONE]\\n\\n';")
    return "\n            ".join(lines)


#: nginx as a plain streaming reverse proxy: the reference the stream
#: scenarios compare the proxy's CPU with (same core, same load, same
#: window). One process (no master), an access log line per request as
#: llmproxy writes one, keep-alive to the upstream, nothing buffered.
_NGINX_PROXY = """daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx-proxy.pid;
error_log {work}/nginx-proxy-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log {work}/nginx-proxy-access.log;
    client_body_temp_path {work}/nginx-proxy-body;
    proxy_temp_path {work}/nginx-proxy-temp;
    fastcgi_temp_path {work}/nginx-proxy-fastcgi;
    uwsgi_temp_path {work}/nginx-proxy-uwsgi;
    scgi_temp_path {work}/nginx-proxy-scgi;
    upstream llm {{
        server 127.0.0.1:{upstream};
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def _start_nginx_proxy(nginx: str, work: Path, port: int, upstream_port: int,
                       core: int | None) -> subprocess.Popen:
    """nginx proxying ``port`` to the upstream, as one process (its pid is
    the one whose CPU counts); stopped again if it does not listen."""
    conf = work / "nginx-proxy.conf"
    conf.write_text(_NGINX_PROXY.format(work=work, port=port, upstream=upstream_port))
    proxy = _start([*_pin(core), nginx, "-c", str(conf), "-p", str(work)],
                   str(work), work / "nginx-proxy.log")
    try:
        _wait_listening(port, proxy, work / "nginx-proxy.log")
    except BaseException:
        _stop(proxy)
        raise
    return proxy


def _raise_open_file_limit() -> None:
    """Raise this process's soft open-file limit as the daemon does (its
    children inherit it): 1,000 streams hold over 2,000 descriptors in the
    proxy, and nginx as one process keeps the limit it is given."""
    from llmproxy.tap import raise_open_file_limit

    try:
        raise_open_file_limit()
    except (ImportError, OSError, ValueError):
        pass  # the runs report what they get


def _nginx() -> str | None:
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _start_upstream(scenario: str, port: int, core: int | None, work: Path,
                    chunks: int = 20, delay: float = 0.0) -> subprocess.Popen:
    """nginx when installed (a canned completion; with the echo module also
    ``chunks`` SSE events ``delay`` s apart for streams), else the fake."""
    nginx = _nginx()
    streaming = scenario != "nonstream"
    if nginx and (not streaming or _ECHO_MODULE.exists()):
        conf = work / "nginx.conf"
        if streaming:
            modules = f"load_module {_ECHO_MODULE};"
            location = _nginx_stream_location(chunks, delay)
        else:
            modules = ""
            location = f"default_type application/json;\n            return 200 '{_COMPLETION}';"
        conf.write_text(_NGINX.format(work=work, port=port, modules=modules, location=location))
        return _start([*_pin(core), nginx, "-c", str(conf), "-p", str(work)],
                      str(work), work / "upstream.log")
    return _start(
        [*_pin(core), sys.executable, "-m", "llmproxy.testing.upstream", "--port", str(port)],
        str(work), work / "upstream.log",
    )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _load(argv: list[str], core: int | None, work: Path,
          watch: int | None = None) -> dict[str, Any]:
    """Run the stream load generator in its own process; return its JSON.

    With ``watch`` (the proxy's pid), the result's ``window`` holds that
    process's CPU over the time every stream was open at once.
    """
    out = work / "load.json"
    subprocess.run(
        [*_pin(core), sys.executable, "-m", "llmproxy._streamload", *argv, str(out),
         *([str(watch)] if watch is not None else [])],
        check=True, cwd=str(work), env=_child_env(),
    )
    return json.loads(out.read_text())


def _stream_summary(results: list[dict]) -> dict[str, Any]:
    ttfb = [r["ttfb_ms"] for r in results if r["ttfb_ms"] is not None]
    return {
        "streams": len(results),
        "aborted": sum(1 for r in results if not r["complete"]),
        "ttfb_p50_ms": round(_percentile(ttfb, 0.5), 2),
        "ttfb_p99_ms": round(_percentile(ttfb, 0.99), 2),
    }


def _rss_mb(pid: int) -> float:
    return _memory_mb(pid, "VmRSS")


#: Stream counts add up over repeated runs; peak RSS is the worst run's.
_SUMMED = frozenset({"streams", "aborted"})
_WORST = frozenset({"proxy_peak_rss_mb"})


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated stream runs as one: each number's median (and its range).

    Args:
        runs: One summary per run, with the same keys.

    Returns:
        The medians (but streams and aborted streams are totals, and peak
        RSS the highest); with more than one run also ``repeats`` and, for
        each median that varied, ``<key>_range`` as ``[min, max]``.
    """
    merged: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if key in _SUMMED:
            merged[key] = sum(values)
        elif key in _WORST:
            merged[key] = max(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ordered = sorted(values)
            middle = len(ordered) // 2
            median = (ordered[middle] if len(ordered) % 2
                      else (ordered[middle - 1] + ordered[middle]) / 2)
            merged[key] = round(median, 2) if isinstance(median, float) else median
            if len(runs) > 1 and ordered[0] != ordered[-1]:
                merged[f"{key}_range"] = [ordered[0], ordered[-1]]
        else:
            merged[key] = values[-1]
    if len(runs) > 1:
        merged["repeats"] = len(runs)
    return merged


def _start_proxy(work: Path, port: int, upstream_port: int, core: int | None) -> subprocess.Popen:
    """llmproxy under twistd, logs and metrics on, listening on ``port``."""
    config = work / "proxy.yml"
    _proxy_config(config, port, upstream_port, True)
    proxy = _start(
        [*_pin(core), sys.executable, "-c",
         "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "llmproxy", "--config", str(config)],
        str(work), work / "proxy.log",
    )
    _wait_listening(port, proxy, work / "proxy.log")
    time.sleep(0.5)  # a CLI tool letting the child settle before measuring
    return proxy


def _run_idle(results: dict[str, Any], work: Path, upstream_port: int,
              proxy_core: int | None, other_core: int | None) -> None:
    """1,000 idle client connections: what they cost in RSS."""
    port = _free_port()
    proxy = _start_proxy(work, port, upstream_port, proxy_core)
    try:
        before_rss = _rss_mb(proxy.pid)
        generator = subprocess.Popen(
            [*_pin(other_core), sys.executable, "-m", "llmproxy._streamload", "idle",
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


def _proxy_config(path: Path, port: int, upstream: int, observability: bool) -> None:
    lines = [
        f'listen: "tcp:{port}:interface=127.0.0.1"',
        f'target_map: {{"/v1/": "http://127.0.0.1:{upstream}"}}',
    ]
    if observability:
        lines += ["admin_listen: null", "log: {file: logs/llmproxy.log, level: info}"]
    else:
        lines += ["admin_listen: null", "metrics: false",
                  "log: {file: null, access: false, level: warn}"]
    path.write_text("\n".join(lines) + "\n")


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


def _describe(python: dict[str, Any]) -> str:
    kind = {True: "shared libpython", False: "static libpython", None: "libpython unknown"}
    return f"python {python['version']} ({python['executable']}, {kind[python['libpython_shared']]})"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return its results."""
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")
    cores = os.cpu_count() or 1
    proxy_core, other_core = (0, 1) if cores >= 2 else (None, None)
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
            variants = [("proxy (logs+metrics on)", True), ("proxy (logs+metrics off)", False)]
            for name, observability in variants * args.repeat:
                port = _free_port()
                config = work / f"{observability}.yml"
                _proxy_config(config, port, upstream_port, observability)
                proxy = _start(
                    [*_pin(proxy_core), sys.executable, "-c",
                     "from twisted.scripts.twistd import run; run()",
                     "-n", "--pidfile=", "llmproxy", "--config", str(config)],
                    tmp, work / "proxy.log",
                )
                try:
                    _wait_listening(port, proxy, work / "proxy.log")
                    cpu_before = cpu_seconds(proxy.pid)
                    run_result = _wrk(f"http://127.0.0.1:{port}{path}", args.connections,
                                      args.duration, chunks, other_core, work)
                    cpu = cpu_seconds(proxy.pid) - cpu_before
                    run_result["proxy_cpu_percent"] = round(100 * cpu / args.duration, 1)
                    run_result["proxy_peak_rss_mb"] = round(_peak_rss_mb(proxy.pid), 1)
                    results["runs"].setdefault(name, []).append(run_result)
                finally:
                    _stop(proxy)
        finally:
            _stop(upstream)
    # Runs alternate on/off; each variant reports its median run by req/s.
    for name in ("proxy (logs+metrics on)", "proxy (logs+metrics off)"):
        repeats = sorted(results["runs"][name], key=lambda r: r["requests_per_s"])
        results["runs"][name] = dict(repeats[len(repeats) // 2], repeats=len(repeats))
    on = results["runs"]["proxy (logs+metrics on)"]["requests_per_s"]
    off = results["runs"]["proxy (logs+metrics off)"]["requests_per_s"]
    results["observability_cost_percent"] = round(100 * (off - on) / off, 1) if off else None
    return results


def _report(results: dict[str, Any]) -> str:
    if results["scenario"] in ("streams", "streams-fast", "idle"):
        load = ""
        if "chunks_per_stream" in results:
            load = (f"{results['chunks_per_stream']} events per stream, "
                    f"{results['new_streams_per_s']:g} new streams a second, ")
        lines = [
            f"scenario {results['scenario']}, {load}proxy pinned: {results['pinned']}, "
            f"{_describe(results['python'])}"
        ]
        for name, run in results["runs"].items():
            lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in run.items()))
        ours = results["runs"].get("proxy (logs+metrics on)", {}).get("proxy_cpu_percent")
        theirs = results["runs"].get("nginx as the proxy (access log on)", {}).get(
            "proxy_cpu_percent")
        if ours and theirs:
            lines.append(f"proxy CPU while all streams are open: llmproxy {ours} %, "
                         f"nginx {theirs} % ({ours / theirs:.1f} times nginx's)")
        return "\n".join(lines)
    lines = [
        f"scenario {results['scenario']}, {results['connections']} connections, "
        f"{results['seconds']:g} s each, proxy pinned to one core: {results['pinned']}, "
        f"upstream: {results['upstream']}, {_describe(results['python'])}",
        f"{'run':<28}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'CPU %':>7}{'RSS MB':>8}",
    ]
    for name, r in results["runs"].items():
        lines.append(
            f"{name:<28}{r['requests_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['errors']:>8}"
            f"{r.get('proxy_cpu_percent', float('nan')):>7.0f}"
            f"{r.get('proxy_peak_rss_mb', float('nan')):>8.1f}"
        )
    lines.append(
        f"logging+metrics cost: {results['observability_cost_percent']}% of throughput"
    )
    direct = results["runs"]["direct"]["requests_per_s"]
    proxy = results["runs"]["proxy (logs+metrics on)"]["requests_per_s"]
    if proxy and direct < 3 * proxy:
        lines.append(
            "note: the upstream is not 3x faster than the proxy here, so the proxy "
            "numbers are bounded by the upstream (compare on/off as a ratio only)"
        )
    return "\n".join(lines)


#: The most events per stream ``--chunks`` takes (a 500 s stream in
#: ``streams``; nginx's config has a line per event).
MAX_CHUNKS = 1000
#: New streams a second the stream generator and the upstream were built
#: for (``streams-fast``'s rate); fewer events per stream ask for more.
MAX_STREAM_RATE = 1000


def _chunks(text: str) -> int:
    """An argparse type: events per stream, 1 to :data:`MAX_CHUNKS`."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_CHUNKS:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1 to {MAX_CHUNKS}, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m llmproxy.bench", description=__doc__)
    parser.add_argument(
        "--scenario",
        choices=("nonstream", "sse", "streams", "streams-fast", "idle"),
        default="nonstream",
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate the on/off runs (or, for streams and streams-fast, "
                             "the direct and proxy runs) this many times; medians reported")
    parser.add_argument("--no-nginx-proxy", dest="nginx_proxy", action="store_false",
                        help="streams and streams-fast: skip the reference run through "
                             "nginx as the proxy (made when nginx is installed)")
    parser.add_argument("--chunks", type=_chunks, default=20,
                        help="streams and streams-fast: content events per stream (default "
                             "20); streams start less often as they get longer, so about "
                             f"{OPEN_STREAMS:,} stay open")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    _raise_open_file_limit()
    results = run(args)
    print(_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
