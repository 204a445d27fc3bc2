"""The benchmark's own pieces (all but one need no wrk or nginx)."""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import urllib.request

import pytest
import pytest_twisted
from helpers import NeedleWaiter, raw_connect, send
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IBodyProducer
from zope.interface.verify import verifyObject

from llmproxy import bench
from llmproxy.config import load_config
from llmproxy.bench import (
    _cli, _hostile, _limitstore, _process, _reference, _report, _scenarios, _servers,
    _streamload, _streams,
)
from llmproxy.testing.upstream import FakeUpstream, make_site

#: Seconds any single wait in a loopback test may take.
WAIT = 10.0

ROOT = Path(__file__).resolve().parent.parent


class _Exit(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_stream_load_generator_measures_streams(reactor, upstreams, proxies, tmp_path):
    """The streams load generator completes streams through the proxy and
    reports their time to first byte."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(f'target_map: {{"/v1/": "{base}"}}\n')
    out = tmp_path / "load.json"
    child = _Exit()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    reactor.spawnProcess(
        child, sys.executable,
        [sys.executable, "-m", "llmproxy.bench._streamload",
         proxy + "/v1/chat/completions", "5", "0.1", "3", "0.01", str(out)],
        env=env, path=str(tmp_path),
    )
    assert await child.ended.addTimeout(30, reactor) == 0, child.output
    loaded = json.loads(out.read_text())
    assert loaded["window"] is None  # no CPU watched
    summary = _report._stream_summary(loaded["streams"])
    assert summary["streams"] == 5 and summary["aborted"] == 0
    assert 0 < summary["ttfb_p50_ms"] <= summary["ttfb_p99_ms"]
    assert len(upstream.requests) == 5


def _refused_url() -> str:
    with socket.socket() as listener:  # a loopback port with nobody on it
        listener.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat/completions"


def test_stream_load_generator_counts_refused_streams_as_aborted() -> None:
    """A stream that never connects is reported, not lost: aborted, with no
    first byte, so the bench's abort count includes it."""
    results, window = _streamload._streams(_refused_url(), 3, 0.01, 2, 0.01)
    assert window is None
    assert results == [{"ttfb_ms": None, "duration_ms": 0, "complete": False}] * 3
    assert _report._stream_summary(results)["aborted"] == 3


def test_stream_load_cpu_is_measured_only_at_full_concurrency() -> None:
    """The proxy's CPU is reported for the time every stream is open at
    once (from when the first would end to the last start), not averaged
    with the ramp-up and ramp-down; driven by a fake clock and CPU."""
    cpu = [0.0]
    # 30 streams of 0.2 s start over 0.6 s: all overlap from 0.2 s to the
    # last start, 0.6 * 29 / 30 = 0.58 s.
    window = _streamload.FullConcurrency(10.0, 30, 0.6, 0.2, lambda: cpu[0])
    for step in range(0, 80):  # the loop turns every 10 ms
        now = 10.0 + step * 0.01
        cpu[0] = step * 0.005 if now < 10.2 else 0.5 + (now - 10.2) * 0.9
        window.tick(now)
        if step == 30:
            assert window.result() is None, "the window is still open"
    result = window.result()
    assert result is not None
    assert result["seconds"] == pytest.approx(0.38, abs=0.011)
    assert result["cpu_seconds"] == pytest.approx(0.9 * result["seconds"], abs=0.01)
    # Streams longer than the spread never all overlap: no window.
    never = _streamload.FullConcurrency(0.0, 3, 0.1, 0.2, lambda: 1.0)
    for step in range(100):
        never.tick(step * 0.01)
    assert not never.exists and never.result() is None


def test_percentile() -> None:
    """Percentiles pick from the sorted values."""
    values = [float(v) for v in range(1, 101)]
    assert _report._percentile(values, 0.5) == 51
    assert _report._percentile(values, 0.99) == 100


def test_repeated_stream_runs_report_medians_ranges_and_every_abort() -> None:
    """Repeated stream runs: medians with their ranges, but every stream and
    every aborted stream counted, and the worst peak RSS."""
    runs = [
        {"streams": 1000, "aborted": 0, "ttfb_overhead_p50_ms": 0.9, "proxy_cpu_percent": 18.0,
         "proxy_peak_rss_mb": 67.0},
        {"streams": 1000, "aborted": 2, "ttfb_overhead_p50_ms": 1.4, "proxy_cpu_percent": 16.0,
         "proxy_peak_rss_mb": 70.5},
        {"streams": 1000, "aborted": 0, "ttfb_overhead_p50_ms": 1.1, "proxy_cpu_percent": 17.0,
         "proxy_peak_rss_mb": 68.0},
    ]
    merged = _report._medians(runs)
    assert merged["streams"] == 3000 and merged["aborted"] == 2
    assert merged["proxy_peak_rss_mb"] == 70.5
    assert merged["ttfb_overhead_p50_ms"] == 1.1
    assert merged["ttfb_overhead_p50_ms_range"] == [0.9, 1.4]
    assert merged["proxy_cpu_percent"] == 17.0 and merged["repeats"] == 3
    assert _report._medians(runs[:1]) == runs[0]


def test_report_names_the_python_that_ran_the_proxy() -> None:
    """The interpreter build changes the numbers by about a third: every
    report says which one ran, and whether its libpython is shared."""
    python = _process._interpreter()
    assert python["version"] == sys.version.split()[0]
    assert python["executable"] == os.path.realpath(sys.executable)
    with open("/proc/self/maps", encoding="utf-8") as maps:
        assert python["libpython_shared"] == ("libpython" in maps.read())
    results = {"scenario": "streams", "pinned": True, "python": python,
               "runs": {"direct": {"streams": 1}}}
    first = _report._report(results).splitlines()[0]
    assert python["executable"] in first
    assert ("shared libpython" if python["libpython_shared"] else "static libpython") in first


def test_report_compares_the_proxy_cpu_with_nginx_as_the_proxy() -> None:
    """With the reference run, the stream report ends with both CPU figures
    and their ratio; without it, with no such line."""
    python = _process._interpreter()
    runs = {
        "direct": {"streams": 10},
        "proxy (logs+metrics on)": {"streams": 10, "proxy_cpu_percent": 18.0},
        "nginx as the proxy (access log on)": {"streams": 10, "proxy_cpu_percent": 7.5},
    }
    results = {"scenario": "streams", "pinned": True, "python": python, "runs": runs}
    assert _report._report(results).splitlines()[-1] == (
        "proxy CPU while all streams are open: llmproxy 18.0 %, nginx 7.5 % "
        "(2.4 times nginx's)"
    )
    del runs["nginx as the proxy (access log on)"]
    assert "times nginx" not in _report._report(results)


@pytest.mark.skipif(_servers._nginx() is None, reason="nginx is not installed")
def test_nginx_reference_proxies_streams_as_they_come_and_logs_each(tmp_path) -> None:
    """The reference run: nginx on its own (one process, whose CPU is
    read), in front of the fake upstream, passes every stream through
    event by event and writes an access line per request, as llmproxy
    does; it is stopped afterwards."""
    upstream_port = _process._free_port()
    upstream = _process._start(
        [sys.executable, "-m", "llmproxy.testing.upstream", "--port", str(upstream_port)],
        str(tmp_path), tmp_path / "upstream.log",
    )
    try:
        _process._wait_listening(upstream_port, upstream, tmp_path / "upstream.log")
        port = _process._free_port()
        proxy = _servers._start_nginx_proxy(_servers._nginx(), tmp_path, port, upstream_port, None)
        # 4 streams of 3 events 0.2 s apart, started over 0.6 s: a window.
        load = ["4", "0.6", "3", "0.2"]
        direct = {"ttfb_p50_ms": 1.0, "ttfb_p99_ms": 2.0}
        summary = _streams._proxied_streams(
            proxy, port, "/v1/chat/completions", load, direct, None, tmp_path)
    finally:
        _process._stop(upstream)
    assert proxy.poll() is not None  # stopped
    assert summary["streams"] == 4 and summary["aborted"] == 0
    # The first event arrives long before the stream's last (0.6 s in).
    assert summary["ttfb_p99_ms"] < 300
    assert summary["ttfb_overhead_p99_ms"] == round(summary["ttfb_p99_ms"] - 2.0, 2)
    assert 0 <= summary["proxy_cpu_percent"] <= 100 and summary["proxy_peak_rss_mb"] > 1
    lines = (tmp_path / "nginx-proxy-access.log").read_text().splitlines()
    assert len(lines) == 4 and all("POST /v1/chat/completions" in line for line in lines)


def test_an_nginx_reference_that_does_not_listen_is_stopped(tmp_path, monkeypatch) -> None:
    """A reference proxy that runs but never listens ends its start with
    the bench's one-line error (the stream run then goes on without it),
    and is not left running."""
    fake = tmp_path / "nginx"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    started: list[subprocess.Popen] = []
    real_start = _process._start

    def start(argv: list[str], cwd: str, log: Path) -> subprocess.Popen:
        started.append(real_start(argv, cwd, log))
        return started[-1]

    def never_listening(port: int, process: subprocess.Popen, log: Path) -> None:
        raise SystemExit(f"bench: nothing listens on port {port} after 20 s")

    monkeypatch.setattr(_servers, "_start", start)
    monkeypatch.setattr(_servers, "_wait_listening", never_listening)
    with pytest.raises(SystemExit, match="nothing listens"):
        _servers._start_nginx_proxy(str(fake), tmp_path, _process._free_port(), 9, None)
    assert len(started) == 1
    assert started[0].poll() == -15  # stopped (SIGTERM), not exited on its own


@pytest.mark.parametrize("chunks", [1, 10, 20, 40, 200])
@pytest.mark.parametrize("scenario", ["streams", "streams-fast"])
def test_stream_loads_keep_a_thousand_streams_open(scenario: str, chunks: int) -> None:
    """Whatever the events per stream, about 1,000 streams are open at once
    (start rate times a stream's length), their starts span at least two
    stream lengths (so the full-concurrency window exists) and the events
    keep the scenario's spacing; the default is the issue's load: 20
    events 500 ms apart starting at 100 a second, or 50 ms apart at 1,000
    a second."""
    count, spread, events, delay = _streams._stream_load(scenario, chunks, 5.0)
    assert (events, delay) == (chunks, 0.05 if scenario == "streams-fast" else 0.5)
    length = chunks * delay
    assert spread == max(2 * length, 5.0)
    assert count / spread * length == pytest.approx(1000, rel=0.01)
    if chunks == 20:
        assert count / spread == (1000 if scenario == "streams-fast" else 100)


def test_the_events_per_stream_are_a_positive_whole_number(capsys) -> None:
    """--chunks 0, over 1,000 (or a word) is refused with a message naming
    the option, before anything starts."""
    for bad in ("0", "-3", "1001", "many"):
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--scenario", "streams", "--chunks", bad])
        assert exit_.value.code == 2
        assert "--chunks" in capsys.readouterr().err


def test_the_stream_report_says_the_load() -> None:
    """The stream report's first line gives the events per stream and the
    start rate, the load's two knobs."""
    results = {"scenario": "streams", "pinned": True, "python": _process._interpreter(),
               "chunks_per_stream": 40, "new_streams_per_s": 50.0,
               "runs": {"direct": {"streams": 1}}}
    first = _report._report(results).splitlines()[0]
    assert "40 events per stream, 50 new streams a second" in first


@pytest.mark.parametrize("size", [42, 43, 44, 45, 1000, 4097])
def test_hostile_body_is_json_of_the_size_asked_with_model_last(size: int) -> None:
    """The hostile body is valid JSON of exactly the size asked: empty
    objects only in ``messages``, then the top-level ``model`` last, which
    the proxy's routing finds."""
    from llmproxy.routing import extract_model

    body = _hostile.hostile_body(size)
    assert len(body) == size
    document = json.loads(body)
    assert list(document) == ["messages", "model"]
    assert document["model"] == _hostile.HOSTILE_MODEL == "big-model"
    assert document["messages"] and all(m == {} for m in document["messages"])
    assert len(document["messages"]) == body.count(b"{}")
    assert len(body) - 4 * len(document["messages"]) < 40  # all but the ends are objects
    assert extract_model(body) == "big-model"


def test_hostile_body_fills_mebibytes_and_refuses_too_small_sizes() -> None:
    """A MiB body is a MiB to the byte; a size too small for one object and
    the model is refused."""
    body = _hostile.hostile_body(1024 * 1024)
    assert len(body) == 1024 * 1024 and body.endswith(b'}], "model": "big-model"}')
    assert _hostile.hostile_body(40) == b'{"messages": [{}], "model": "big-model"}'
    with pytest.raises(ValueError, match="at least 40 bytes"):
        _hostile.hostile_body(39)


def test_hostile_config_routes_the_model_and_takes_the_body(tmp_path) -> None:
    """The proxy's config for hostile-body passes the daemon's own config
    check, routes ``big-model`` by ``model_routes`` (so the proxy looks
    for ``model``) and takes a body of the largest size allowed."""
    biggest = _hostile.MAX_BODY_MIB * 1024 * 1024
    path = tmp_path / "proxy.yml"
    _servers._proxy_config(path, 8080, 9090, True, _hostile._hostile_config(9090, biggest))
    config = load_config(str(path))
    assert list(config.model_routes) == ["big-model"]
    assert config.max_body_bytes > biggest
    _servers._proxy_config(path, 8080, 9090, True, _hostile._hostile_config(9090, 1024))
    assert load_config(str(path)).max_body_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize("option,bad,most", [
    ("--body-mib", "0", 256), ("--body-mib", "257", 256), ("--body-mib", "-1", 256),
    ("--body-mib", "32.5", 256), ("--body-mib", "big", 256),
    ("--bodies", "0", 20), ("--bodies", "21", 20),
])
def test_hostile_options_are_checked_before_anything_starts(
        capsys, option: str, bad: str, most: int) -> None:
    """--body-mib outside 1 to 256 MiB (or --bodies outside 1 to 20, or a
    word) is refused with a usage error naming the option and the range."""
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--scenario", "hostile-body", option, bad])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected a whole number from 1 to {most}, got {bad!r}" in err


def test_hostile_option_bounds_are_allowed() -> None:
    """The range's ends are taken as they are."""
    body_mib = _cli._whole_number(_hostile.MAX_BODY_MIB)
    assert (body_mib("1"), body_mib("256")) == (1, 256)


def test_phase_summary_counts_the_requests_in_flight_during_the_phase() -> None:
    """A phase counts every request in flight at some time during it (a
    request stalled across its start too), its failures as errors, and
    the latency of the 2xx ones."""
    samples = [
        (0.0, 0.5, 200),     # over before the phase
        (0.9, 0.2, 200),     # started before, stalled into it
        (1.1, 0.001, 200),
        (1.2, 0.003, 200),
        (1.3, 0.002, 0),     # connection failed
        (1.4, 0.004, 502),
        (2.5, 0.001, 200),   # after it
    ]
    phase = _report._phase_summary(samples, 1.0, 2.0)
    assert phase == {"seconds": 1.0, "requests": 5, "errors": 2,
                     "p50_ms": 3.0, "p99_ms": 200.0, "max_ms": 200.0}
    empty = _report._phase_summary(samples, 3.0, 4.0)
    assert empty["requests"] == 0 and empty["max_ms"] != empty["max_ms"]  # nan


def test_hostile_report_gives_rss_latencies_stall_and_the_bodies() -> None:
    """The hostile-body report: a line for the load, the daemon's RSS
    (growth in MB and per body size), each phase, the stall and the
    bodies' own latency."""
    phase = {"seconds": 1.25, "requests": 900, "errors": 0,
             "p50_ms": 1.0, "p99_ms": 2.5, "max_ms": 3.25}
    results = {
        "scenario": "hostile-body", "pinned": True, "upstream": "nginx",
        "python": {"version": "3.11.2", "executable": "/usr/bin/python3.11",
                   "libpython_shared": False},
        "body_mib": 32, "body_bytes": 33554432, "objects_per_body": 8388598, "bodies": 3,
        "runs": {"baseline": phase,
                 "hostile bodies": dict(phase, requests=700, p50_ms=1.5, p99_ms=90.0,
                                        max_ms=301.0)},
        "rss": {"before_mb": 66.0, "peak_mb": 130.5, "after_mb": 70.25, "growth_mb": 64.5,
                "growth_per_body_size": 2.02, "peak_reset_after_warm_up": True},
        "stall_ms": 300.0,
        "hostile_requests": [{"status": 200, "latency_ms": 420.06},
                             {"status": 200, "latency_ms": 401.0}],
    }
    assert _report._report(results).splitlines() == [
        "scenario hostile-body, 3 bodies of 32 MiB one after another (8,388,598 empty "
        "objects each, model last), proxy pinned to one core: True, upstream: nginx, "
        "python 3.11.2 (/usr/bin/python3.11, static libpython)",
        "daemon RSS: 66.0 MB after warm-up, peak 130.5 MB with the bodies (+64.5 MB, "
        "2.02 times the 32 MiB body), 70.25 MB after them",
        "small requests, baseline: 1.25 s, 900 requests, 0 errors, latency p50 1.00 ms, "
        "p99 2.50 ms, max 3.25 ms",
        "small requests, hostile bodies: 1.25 s, 700 requests, 0 errors, latency p50 1.50 ms, "
        "p99 90.00 ms, max 301.00 ms",
        "stall other clients see: 300.00 ms (max latency with the bodies minus the "
        "baseline p50)",
        "hostile requests: 200, 200 in 420.1, 401.0 ms",
    ]
    results["rss"]["peak_reset_after_warm_up"] = False
    assert "peak 130.5 MB since start (VmHWM could not be reset)" in _report._report(results)


def test_limit_store_defaults_to_none_and_applies_to_wrk_scenarios(capsys) -> None:
    """--limit-store is none unless asked; nonstream and sse take each
    choice; another scenario, or an unknown store, is a usage error."""
    assert _cli._parse_args([]).limit_store == "none"
    assert _cli._parse_args(["--scenario", "streams"]).limit_store == "none"
    for scenario, store in itertools.product(("nonstream", "sse"), _limitstore.LIMIT_STORES):
        assert _cli._parse_args(["--scenario", scenario, "--limit-store", store]).limit_store \
            == store
    for argv, message in [
        (["--limit-store", "disk"], "invalid choice: 'disk'"),
        (["--scenario", "streams", "--limit-store", "redis"],
         "redis applies to the nonstream and sse scenarios only, not streams"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            bench.main(argv)
        assert exit_.value.code == 2
        assert "--limit-store" in (err := capsys.readouterr().err) and message in err


@pytest.mark.parametrize("observability", [True, False])
@pytest.mark.parametrize("store", _limitstore.LIMIT_STORES)
def test_limit_store_config_passes_the_daemons_check(tmp_path, store: str,
                                                     observability: bool) -> None:
    """Each store's config lines load as the daemon loads them: no limit,
    or one that never refuses, in the process or in the local Redis (which
    needs its port; an unknown store is a bug)."""
    path = tmp_path / "proxy.yml"
    _servers._proxy_config(path, 8080, 9090, observability,
                           _limitstore.limit_config(store, 6390))
    limit = load_config(str(path)).rate_limit
    if store == "none":
        assert limit is None
        return
    assert (limit.rate, limit.burst, limit.key) == (1_000_000, 1_000_000, "ip")
    assert limit.store == ("redis://127.0.0.1:6390/0" if store == "redis" else None)
    assert (limit.store_timeout, limit.on_store_error) == (0.05, "allow")
    with pytest.raises(ValueError, match="no config for limit store"):
        _limitstore.limit_config(store + "-not", 6390)
    with pytest.raises(ValueError, match="no config for limit store 'redis'"):
        _limitstore.limit_config("redis")


@pytest.mark.parametrize("store", _limitstore.LIMIT_STORES)
def test_budget_config_gives_every_request_a_budget_no_load_spends(
    tmp_path, store: str, capsys
) -> None:
    """--budget: the config loads with one named key whose token budget no
    bench load spends, beside the store's rate limit; wrk's script sends
    that key; other scenarios refuse the flag."""
    path = tmp_path / "proxy.yml"
    _servers._proxy_config(path, 8080, 9090, True,
                           _limitstore.limit_config(store, 6390, budget=True))
    config = load_config(str(path))
    (key,) = config.auth.keys
    assert key.name == "bench" and key.budget.tokens >= 10 ** 12
    assert (config.rate_limit is None) == (store == "none")
    assert _cli._parse_args(["--scenario", "sse", "--budget"]).budget
    with pytest.raises(SystemExit):
        bench.main(["--scenario", "streams", "--budget"])
    assert "--budget applies to the nonstream and sse" in capsys.readouterr().err


def test_redis_replies_and_info_are_read() -> None:
    """RESP: the command is an array of bulk strings; simple, integer and
    bulk replies are read, an error or a cut reply raises OSError; INFO's
    script calls (EVAL and EVALSHA) and commands processed are counted."""
    assert _limitstore._encode(("INFO", "all")) == b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n"
    for reply, value in [(b"+PONG\r\n", b"PONG"), (b":7\r\n", b"7"),
                         (b"$5\r\na\r\nbc\r\n", b"a\r\nbc"), (b"$-1\r\n", b"")]:
        assert _limitstore._read_reply(io.BytesIO(reply)) == value
    for reply in (b"-ERR no\r\n", b"$5\r\nab", b"", b"*1\r\n"):
        with pytest.raises(OSError):
            _limitstore._read_reply(io.BytesIO(reply))
    info = _limitstore._parse_info(
        "# Stats\r\ntotal_commands_processed:4497\r\n\r\n# Commandstats\r\n"
        "cmdstat_evalsha:calls=1122,usec=9,usec_per_call=0.1,rejected_calls=0\r\n"
        "cmdstat_eval:calls=2,usec=1,usec_per_call=0.5\r\n"
        "cmdstat_time:calls=1124,usec=3,usec_per_call=0.01\r\n")
    assert info["total_commands_processed"] == "4497"
    assert _limitstore._script_calls(info) == 1124
    assert _limitstore._script_calls({}) == 0


def test_redis_that_never_answers_or_exits_fails_the_bench(tmp_path) -> None:
    """Waiting for Redis takes a bounded number of connects; a Redis that
    exited ends the bench with its log."""
    log = tmp_path / "redis.log"
    log.write_text("Fatal: bad option\n")
    port = int(_refused_url().split(":")[2].split("/")[0])
    running = SimpleNamespace(poll=lambda: None)
    with pytest.raises(SystemExit, match="did not answer on port .* after 3 tries"):
        _limitstore._wait_redis(port, running, log, tries=3, step=0)
    exited = SimpleNamespace(poll=lambda: 1, returncode=1)
    with pytest.raises(SystemExit, match="(?s)exited early.*Fatal: bad option"):
        _limitstore._wait_redis(port, exited, log, tries=3, step=0)


def test_redis_must_see_about_every_request() -> None:
    """A run Redis saw nothing of, or under 90 % of, fails; wrk's last
    requests in flight may make Redis see a few more."""
    for seen in (1016, 900):
        _limitstore.check_seen(1000, seen)
    with pytest.raises(SystemExit, match="Redis saw none of the 1,000 requests"):
        _limitstore.check_seen(1000, 0)
    with pytest.raises(SystemExit, match="only 899 of the 1,000 requests"):
        _limitstore.check_seen(1000, 899)


def test_wrk_report_names_the_limit_store_and_what_redis_saw() -> None:
    """The first line names the store (none for results from before the
    option); with Redis a last line gives the scripts it ran."""
    run = {"requests_per_s": 1000.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "errors": 0}
    results = {"scenario": "nonstream", "connections": 16, "seconds": 5.0, "pinned": True,
               "upstream": "nginx", "python": _process._interpreter(),
               "observability_cost_percent": 10.0,
               "runs": {"direct": dict(run, requests_per_s=40000.0),
                        "proxy (logs+metrics on)": run, "proxy (logs+metrics off)": run}}
    assert _report._report(results).startswith("scenario nonstream, 1 proxy worker, "
                                               "limit store: none (no rate limit), 16 conn")
    results["limit_store"] = "memory"
    assert "limit store: memory (a rate limit in the process)," in _report._report(results)
    runs = [{"requests": n, "redis_scripts": n + 16, "redis_commands": 4 * n + 64}
            for n in (5000, 4000)]
    results.update(limit_store="redis", redis=_limitstore.seen_summary(
        {"port": 6390, "version": "7.0.15"}, runs))
    lines = _report._report(results).splitlines()
    assert ("limit store: redis (a shared rate limit, redis 7.0.15 on 127.0.0.1:6390), "
            "16 connections") in lines[0]
    assert lines[-1] == ("redis ran the rate-limit script 9,032 times for 9,000 requests "
                         "through the proxy (1.004 a request; 36,128 commands in all, those "
                         "in the scripts included)")


# The twisted.web + Agent reference proxy (llmproxy.bench._reference).

_STREAM = {**json.loads(bench.CHAT), "stream": True}


class _Events(Protocol, NeedleWaiter):
    """A response body read as it comes; ``ended`` fires with why it ended
    (``ResponseDone`` when whole)."""

    def __init__(self) -> None:
        NeedleWaiter.__init__(self)
        self.ended: Deferred[BaseException] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.feed(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.ended.callback(reason.value)


async def _read(response: Any, reactor: Any) -> bytes:
    """A response's whole body, which must end cleanly."""
    body = _Events()
    response.deliverBody(body)
    assert isinstance(await body.ended.addTimeout(WAIT, reactor), ResponseDone)
    return bytes(body.received)


def _head(response: Any) -> dict[bytes, list[bytes]]:
    """A response's status, length and headers, but the date (wall clock)."""
    headers = {name.lower(): values for name, values in response.headers.getAllRawHeaders()
               if name.lower() != b"date"}
    return {b"status": [b"%d" % response.code], b"length": [repr(response.length).encode()],
            **headers}


@pytest_twisted.async_yield_fixture
async def twins(reactor: Any, loopback: Any) -> Any:
    """``await twins()``: two fake upstreams whose timers run on their own
    clocks (they send the same bytes for the same first request), the
    reference proxy in front of the first; returns the first upstream and
    its clock, the proxy's URL and the second upstream's. With
    ``twins(real_time=True)`` the first runs on the reactor's time instead
    (its ``X-Fake-Body-Bytes`` producer needs it). Pools are closed after
    the test, then the ports stopped."""
    pools: list[Any] = []

    async def start(real_time: bool = False) -> tuple[FakeUpstream, Clock, str, str]:
        clock, twin_clock = Clock(), Clock()
        upstream = FakeUpstream(reactor if real_time else clock)
        base = await loopback(make_site(reactor, upstream))
        direct = await loopback(make_site(reactor, FakeUpstream(twin_clock)))
        proxy = _reference.ReferenceProxy(reactor, base)
        pools.append(proxy.pool)
        return upstream, clock, await loopback(_reference.QuietSite(proxy)), direct

    yield start
    for pool in pools:
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_reference_proxy_forwards_a_completion_byte_for_byte(reactor, twins, client):
    """The reference proxy forwards method, path and query, end-to-end
    headers and body, and the upstream's answer comes back as the upstream
    sent it: status, headers (Content-Length kept) and body."""
    upstream, _, proxy, direct = await twins()
    path = "/v1/chat/completions?api-version=2024-06-01"
    headers = {"X-Client": "bench", "Connection": "X-Hop", "X-Hop": "dropped"}
    through = await send(client, reactor, proxy + path, bench.CHAT.encode(), headers=headers)
    body = await _read(through, reactor)
    straight = await send(client, reactor, direct + path, bench.CHAT.encode(), headers=headers)
    assert body == await _read(straight, reactor)
    assert json.loads(body)["object"] == "chat.completion"
    assert _head(through) == _head(straight) and through.length == len(body)
    (seen,) = upstream.requests
    assert (seen.method, seen.uri, seen.body) == (b"POST", path.encode(), bench.CHAT.encode())
    assert seen.headers.getRawHeaders(b"x-client") == [b"bench"]
    assert not seen.headers.hasHeader(b"x-hop")  # named by Connection: hop-by-hop
    assert verifyObject(IBodyProducer, _reference.BytesBody(b"{}"))


@pytest_twisted.ensureDeferred
async def test_reference_proxy_streams_events_one_by_one(reactor, twins, client):
    """An SSE stream comes back event by event, each as the upstream sends
    it (the upstream's clock releases one event at a time), and whole: the
    same bytes as straight from the upstream."""
    upstream, clock, proxy, direct = await twins()
    url = "/v1/chat/completions"
    straight = await _read(await send(client, reactor, direct + url, _STREAM,
                                      headers={"X-Fake-Chunks": "3"}), reactor)
    response = await send(client, reactor, proxy + url, _STREAM,
                          headers={"X-Fake-Chunks": "3", "X-Fake-Chunk-Delay": "1"})
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    events = _Events()
    response.deliverBody(events)
    # The role event, 3 content events and the stop event; [DONE] then ends it.
    for count in range(1, 6):
        await events.wait_for(b"\n\n", count).addTimeout(WAIT, reactor)
        assert bytes(events.received).count(b"\n\n") == count  # no more sent yet
        assert not upstream.requests[0].done.called
        clock.advance(1)
    assert isinstance(await events.ended.addTimeout(WAIT, reactor), ResponseDone)
    assert bytes(events.received) == straight and straight.endswith(b"data: [DONE]\n\n")
    assert await upstream.requests[0].done.addTimeout(WAIT, reactor) == "finished"


@pytest_twisted.ensureDeferred
async def test_reference_proxy_holds_no_body_and_lets_go_of_a_gone_client(reactor, twins):
    """A client that stops reading pauses the upstream (the upstream
    connection is the client's producer: nothing piles up in the proxy);
    when the client goes away, the proxy closes the upstream connection."""
    upstream, _, proxy, _ = await twins(real_time=True)
    size = 64 * 1024 * 1024
    arrived = upstream.next_request()
    raw = await raw_connect(reactor, proxy, b"GET /v1/blob HTTP/1.1\r\nHost: x\r\n"
                                            b"X-Fake-Body-Bytes: %d\r\n\r\n" % size)
    raw.transport.pauseProducing()
    seen = await arrived.addTimeout(WAIT, reactor)
    await seen.paused.addTimeout(WAIT, reactor)
    assert seen.bytes_sent < size // 2
    raw.transport.abortConnection()
    assert await seen.done.addTimeout(WAIT, reactor) == "disconnected"
    assert seen.bytes_sent < size // 2


@pytest_twisted.ensureDeferred
async def test_reference_proxy_answers_502_without_an_upstream(reactor, loopback, client):
    """An upstream that refuses connections makes a 502, not a hang."""
    proxy = _reference.ReferenceProxy(reactor, _refused_url().rsplit("/v1/", 1)[0])
    try:
        url = await loopback(_reference.QuietSite(proxy))
        response = await send(client, reactor, url + "/v1/models", method=b"GET")
        assert response.code == 502
        assert await _read(response, reactor) == b"bad gateway\n"
    finally:
        await proxy.pool.closeCachedConnections()


def test_reference_proxy_runs_as_the_bench_starts_it(tmp_path) -> None:
    """The bench's command runs the reference as its own process on the
    epoll reactor, in front of the fake upstream; it writes no log line for
    the requests it serves and exits cleanly on SIGTERM."""
    upstream_port, port = _process._free_port(), _process._free_port()
    upstream = _process._start(
        [sys.executable, "-m", "llmproxy.testing.upstream", "--port", str(upstream_port)],
        str(tmp_path), tmp_path / "upstream.log")
    argv = _servers._reference_argv(port, upstream_port, None)
    assert argv[:3] == [sys.executable, "-m", "llmproxy.bench._reference"]
    pinned = _servers._reference_argv(port, upstream_port, "0")
    assert pinned == _process._pin("0") + argv  # on the proxy's core
    reference = _process._start(argv, str(tmp_path), tmp_path / "reference.log")
    try:
        _process._wait_listening(upstream_port, upstream, tmp_path / "upstream.log")
        _process._wait_listening(port, reference, tmp_path / "reference.log")
        fds = Path(f"/proc/{reference.pid}/fd")
        assert "anon_inode:[eventpoll]" in {os.readlink(fd) for fd in fds.iterdir()}
        for _ in range(3):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=bench.CHAT.encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=WAIT) as answer:
                assert json.loads(answer.read())["object"] == "chat.completion"
    finally:
        _process._stop(reference)
        _process._stop(upstream)
    assert reference.returncode == 0
    assert (tmp_path / "reference.log").read_text() == ""


def _wrk_run(requests_per_s: float, p50_ms: float) -> dict[str, Any]:
    """A wrk run's figures, as :func:`_scenarios._wrk` returns them."""
    return {"requests_per_s": requests_per_s, "requests": int(5 * requests_per_s),
            "p50_ms": p50_ms, "p90_ms": 2 * p50_ms, "p99_ms": 3 * p50_ms, "errors": 0,
            "socket_errors": ""}


def test_reference_runs_alternate_with_the_proxys_on_its_core(tmp_path, monkeypatch) -> None:
    """With the reference, each repeat runs the proxy with logs and metrics
    on, off, then the reference, one process on the proxy's core, with the
    same load; the reference's runs are measured like the proxy's."""
    started: list[list[str]] = []
    speeds = {"True.yml": 1000.0, "False.yml": 1500.0, "_reference": 2000.0}

    def start(argv: list[str], cwd: str, log: Path) -> Any:
        started.append(argv)
        return SimpleNamespace(pid=4242, argv=argv)

    def wrk(url: str, connections: int, seconds: float, chunks: int, core: Any,
            work: Path, budget: bool = False) -> dict[str, Any]:
        assert (connections, seconds, chunks, core, budget) == (16, 5.0, 20, "1", False)
        kind = next(k for k in speeds if any(a.endswith(k) for a in started[-1]))
        return _wrk_run(speeds[kind] + len(started), 1000 / speeds[kind])

    cpu = itertools.count()
    monkeypatch.setattr(_scenarios, "_start", start)
    monkeypatch.setattr(_scenarios, "_wait_listening", lambda port, process, log: None)
    monkeypatch.setattr(_scenarios, "_await_workers",
                        lambda process, workers, log: [process.pid] * workers)
    monkeypatch.setattr(_scenarios, "_wrk", wrk)
    monkeypatch.setattr(_scenarios, "tree_cpu_seconds", lambda pids: float(next(cpu)))
    monkeypatch.setattr(_scenarios, "_peak_rss_mb", lambda pid: 50.0)
    monkeypatch.setattr(_scenarios, "_stop", lambda process: None)
    args = SimpleNamespace(limit_store="none", budget=False, workers=1, repeat=2, connections=16,
                           duration=5.0)
    results: dict[str, Any] = {"runs": {}}
    _scenarios._wrk_proxy_runs(args, results, tmp_path, 9999, 20, "0", "1", None, True)
    kinds = [next(k for k in speeds if any(a.endswith(k) for a in argv)) for argv in started]
    assert kinds == ["True.yml", "False.yml", "_reference"] * 2
    for argv in started:
        assert argv[:len(_process._pin("0"))] == _process._pin("0")
    port = started[2][started[2].index("--port") + 1]
    assert started[2] == _servers._reference_argv(int(port), 9999, "0")
    runs = results["runs"]
    assert list(runs) == [_report.PROXY_ON, _report.PROXY_OFF, _report.REFERENCE]
    assert [r["requests_per_s"] for r in runs[_report.REFERENCE]] == [2003.0, 2006.0]
    assert all(r["proxy_processes"] == 1 and r["proxy_cpu_seconds"] == 1.0
               for r in runs[_report.REFERENCE])
    _scenarios._wrk_proxy_runs(args, results, tmp_path, 9999, 20, "0", "1", None, False)
    assert not any(a.endswith("_reference") for argv in started[6:] for a in argv)


def test_the_reference_is_made_unless_asked_not_to_or_for_several_workers() -> None:
    """--no-reference skips the reference; so do several workers (it is one
    process); the default makes it."""
    assert _cli._parse_args([]).reference is True
    assert _cli._parse_args(["--scenario", "sse", "--no-reference"]).reference is False
    assert _scenarios.reference_skipped(True, 1) is None
    assert _scenarios.reference_skipped(False, 1) == "--no-reference"
    assert _scenarios.reference_skipped(True, 2) == (
        "it is one process and the proxy ran 2 (compare with --workers 1)")


def test_reference_ratios_divide_the_medians_and_pair_the_repeats() -> None:
    """The ratios divide llmproxy's median run by the reference's (req/s and
    p50 latency) and, run by run, each req/s by the reference run made with
    it."""
    runs = {
        _report.PROXY_ON: [_wrk_run(900.0, 11.0), _wrk_run(1100.0, 9.0), _wrk_run(1000.0, 10.0)],
        _report.PROXY_OFF: [_wrk_run(1200.0, 8.0), _wrk_run(1300.0, 7.0), _wrk_run(1250.0, 7.5)],
        _report.REFERENCE: [_wrk_run(1000.0, 8.0), _wrk_run(1250.0, 6.0), _wrk_run(1200.0, 7.0)],
    }
    ratios = _report.reference_ratios(runs)
    assert ratios == {
        _report.PROXY_ON: {"requests_per_s": 0.833, "p50_ms": 1.429,
                           "requests_per_s_by_repeat": [0.9, 0.88, 0.833]},
        _report.PROXY_OFF: {"requests_per_s": 1.042, "p50_ms": 1.071,
                            "requests_per_s_by_repeat": [1.2, 1.04, 1.042]},
    }
    median = _report.median_run(runs[_report.REFERENCE])
    assert median["requests_per_s"] == 1200.0 and median["repeats"] == 3
    assert median["requests_per_s_range"] == [1000.0, 1250.0]
    assert "requests_per_s_range" not in _report.median_run(runs[_report.REFERENCE][:1])
    nothing = {**runs, _report.REFERENCE: [_wrk_run(0.0, float("nan"))]}
    assert _report.reference_ratios(nothing)[_report.PROXY_ON]["requests_per_s"] is None


def test_wrk_report_gives_llmproxy_as_a_ratio_to_the_reference() -> None:
    """The report has a row for the reference and a line per llmproxy
    variant with its req/s and p50 latency as ratios to the reference's
    (with the range by repeat), then what the ratios mean; a skipped
    reference is said to be, and old results have no such line."""
    ratios = {
        _report.PROXY_ON: {"requests_per_s": 1.03, "p50_ms": 0.97,
                           "requests_per_s_by_repeat": [1.01, 1.05, 1.03]},
        _report.PROXY_OFF: {"requests_per_s": 1.104, "p50_ms": 0.9,
                            "requests_per_s_by_repeat": [1.104]},
    }
    results = {"scenario": "sse", "connections": 16, "seconds": 5.0, "pinned": True,
               "upstream": "nginx", "python": _process._interpreter(),
               "observability_cost_percent": 7.2,
               "runs": {"direct": _wrk_run(20000.0, 0.8),
                        _report.PROXY_ON: _wrk_run(1030.0, 9.7),
                        _report.PROXY_OFF: _wrk_run(1104.0, 9.0),
                        _report.REFERENCE: _wrk_run(1000.0, 10.0)},
               "reference": {"run": _report.REFERENCE, "ratios": ratios}}
    lines = _report._report(results).splitlines()
    assert lines[2].startswith("direct")
    assert lines[5].split() == ["twisted.web+Agent", "reference", "1000", "10.00", "20.00",
                                "30.00", "0", "nan", "nan", "-"]
    cost = lines.index("logging+metrics cost: 7.2% of throughput")
    assert lines[cost + 1:cost + 4] == [
        "llmproxy (logs+metrics on) / twisted.web+Agent reference = 1.03x req/s "
        "(by repeat 1.01x to 1.05x), 0.97x p50 latency",
        "llmproxy (logs+metrics off) / twisted.web+Agent reference = 1.10x req/s, "
        "0.90x p50 latency",
        "(req/s above 1x: llmproxy is faster than the reference; p50 latency below 1x: it "
        "answers sooner; medians of runs made in turn in this sitting)",
    ]
    results["reference"] = {"skipped": "--no-reference"}
    del results["runs"][_report.REFERENCE]
    lines = _report._report(results).splitlines()
    assert lines[lines.index("logging+metrics cost: 7.2% of throughput") + 1] == (
        "no twisted.web+Agent reference run: --no-reference")
    del results["reference"]
    assert "twisted.web+Agent" not in _report._report(results)
