"""``workers: N``: one ``/metrics`` summing every worker (prometheus_client's
multiprocess mode), and nothing of it with one worker."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool

from helpers import collect, fetch, send
from llmproxy.config import parse_config_text
from llmproxy.metrics import MULTIPROC_DIR_ENV, multiprocess_possible
from llmproxy.workers import main_process
from llmproxy.workers import MetricsDirectory, share_metrics
from test_tap import (
    ROOT, WAIT, demo_config, free_port, kill_if_running, spawn_twistd, terminate,
)

#: Requests sent through the two workers.
REQUESTS = 200

#: What starts an access record printed on stdout.
ACCESS_LINE = b"[llmproxy.access#info]"

ONE_WORKER = """\
listen: "tcp:0:interface=127.0.0.1"
target_map: {"/v1/": "http://127.0.0.1:1"}
admin_listen: null
"""


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[tuple[str, tuple], float], name: str) -> float:
    """The sum of every sample named ``name``, over all label values."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def metrics_dirs(tmp: Path) -> list[Path]:
    """The per-run metrics directories under ``tmp``."""
    return sorted(tmp.glob("llmproxy-metrics-*"))


def access_records(logs: Path) -> list[int]:
    """The access records in worker 1's and worker 2's log files."""
    return [
        path.read_text().count('"log_namespace": "llmproxy.access"') if path.exists() else 0
        for path in (logs / "llmproxy.log", logs / "llmproxy-worker2.log")
    ]


@pytest_twisted.ensureDeferred
async def test_metrics_sum_over_two_workers(
    reactor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With workers: 2, /metrics counts every request of both workers exactly
    once, in flight is 0 when idle, and the run's directory goes on SIGTERM."""
    port, demo_port, admin_port = free_port(), free_port(), free_port()
    config = demo_config(
        tmp_path / "config.yml", port, demo_port,
        f'workers: 2\nadmin_listen: "tcp:{admin_port}:interface=127.0.0.1"\n'
        # Access records on stdout too: the test waits for them there.
        "log: {console_access: true}\n",
    )
    # The daemon makes its metrics directory in $TMPDIR: here, to watch it.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)
    process = spawn_twistd(reactor, config, tmp_path)
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    admin = f"http://127.0.0.1:{admin_port}/metrics"
    try:
        await process.wait_for(b"worker 2 serving").addTimeout(WAIT, reactor)
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        await process.wait_for(b"starting on %d" % admin_port).addTimeout(WAIT, reactor)
        (shared,) = metrics_dirs(tmp)

        async def one() -> int:
            # A fresh connection each: the kernel spreads them over both.
            response = await send(agent, reactor, f"http://127.0.0.1:{port}/v1/models",
                                  method=b"GET")
            await collect(response).done.addTimeout(WAIT, reactor)
            return response.code

        for _ in range(REQUESTS // 40):
            codes = await gatherResults(
                [Deferred.fromCoroutine(one()) for _ in range(40)]
            ).addTimeout(WAIT, reactor)
            assert set(codes) == {200}
        # Each request is counted as it finishes, a moment after its last
        # byte reached us, by the worker that served it, right after that
        # worker prints its access record: wait for every record, then for
        # both workers to handle a later event (SIGHUP, passed on from
        # worker 1 to worker 2, reloads the unchanged config on each), so
        # that every count is in before the one scrape.
        await process.wait_for(ACCESS_LINE, REQUESTS).addTimeout(WAIT, reactor)
        process.transport.signalProcess("HUP")
        await process.wait_for(b"config reloaded from", 2).addTimeout(WAIT, reactor)
        response, body = await fetch(agent, reactor, admin, method=b"GET")
        assert response.code == 200
        samples = parse(body.decode())
        counts = access_records(tmp_path / "logs")
        assert all(counts), f"both workers served: {counts}"
        assert sum(counts) == REQUESTS
        assert total(samples, "llmproxy_requests_total") == REQUESTS
        assert total(samples, "llmproxy_request_duration_seconds_count") == REQUESTS
        assert total(samples, "llmproxy_upstream_ttfb_seconds_count") == REQUESTS
        assert samples[("llmproxy_inflight_requests", ())] == 0
        assert ("llmproxy_client_connections", ()) in samples
        # Worker 1's resolver only (see llmproxy.metrics), but served.
        assert ("llmproxy_dns_cache_hits_total", ()) in samples
        # Both processes wrote their own counters into the run's directory.
        assert len(list(shared.glob("counter_*.db"))) == 2
        code = await terminate(process, reactor)
    finally:
        await kill_if_running(process, reactor)
    assert code == 0, process.output.decode()
    assert b"worker 2 ended" in process.output
    assert metrics_dirs(tmp) == [], "the metrics directory is removed on stop"


def test_one_worker_needs_no_metrics_directory(
    reactor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """workers: 1 (the default) sets no PROMETHEUS_MULTIPROC_DIR, makes no
    directory, and serves the process's own instruments as before."""
    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = tmp_path / "config.yml"
    path.write_text(ONE_WORKER)
    config = parse_config_text(ONE_WORKER, environ={})
    assert config.workers == 1
    assert share_metrics(config, reactor) is None
    daemon = main_process(config, reactor, str(path))
    assert "metrics-dir" not in [s.name for s in daemon]
    assert MULTIPROC_DIR_ENV not in os.environ
    assert metrics_dirs(tmp_path) == []
    metrics = daemon.getServiceNamed("gateway").metrics
    assert metrics.multiprocess_dir is None
    metrics.started()
    metrics.observe({"route": "/v1/", "model": None, "upstream": "u", "status": 200})
    assert metrics.registry.get_sample_value(
        "llmproxy_requests_total",
        {"route": "/v1/", "model": "none", "upstream": "u", "status_class": "2xx"},
    ) == 1
    assert metrics.registry.get_sample_value("llmproxy_inflight_requests") == 0


def test_metrics_directory_is_made_named_and_removed(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's directory is new and empty, named in the environment it is
    given, and removed (the environment restored) on stop."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    clock = Clock()
    environ = {MULTIPROC_DIR_ENV: "/somewhere/else"}
    directory = MetricsDirectory(clock, environ)
    shared = Path(directory.path)
    assert shared.parent == tmp_path and shared.is_dir()
    assert list(shared.iterdir()) == []
    assert environ[MULTIPROC_DIR_ENV] == directory.path
    directory.startService()
    stopped = directory.stopService()
    assert shared.is_dir(), "removed on the reactor's next turn"
    clock.advance(0)
    assert stopped.called
    assert not shared.exists()
    assert environ == {MULTIPROC_DIR_ENV: "/somewhere/else"}
    directory.remove()  # again: nothing left to do


def test_too_late_for_multiprocess_mode_is_worker_one_only(
    reactor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When prometheus_client was imported without the variable (as in this
    test process), workers > 1 fall back to worker 1's own metrics."""
    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)
    from prometheus_client import values  # imported without the variable

    assert values.ValueClass is values.MutexValue
    assert not multiprocess_possible()
    config = parse_config_text(ONE_WORKER + "workers: 2\n", environ={})
    assert share_metrics(config, reactor) is None
    assert MULTIPROC_DIR_ENV not in os.environ


def test_importing_the_daemon_leaves_prometheus_client_unimported() -> None:
    """twistd imports llmproxy.tap before the config is read: prometheus_client
    must not be imported yet, so that the first process can still choose
    multiprocess mode."""
    script = (
        "import sys, llmproxy.tap, llmproxy.workers, llmproxy.web, llmproxy.metrics\n"
        "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
