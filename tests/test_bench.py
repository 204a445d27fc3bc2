"""The benchmark's own pieces that need no wrk or nginx."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.defer import Deferred

from llmproxy import bench

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
        [sys.executable, "-m", "llmproxy._streamload",
         proxy + "/v1/chat/completions", "5", "0.1", "3", "0.01", str(out)],
        env=env, path=str(tmp_path),
    )
    assert await child.ended.addTimeout(30, reactor) == 0, child.output
    results = json.loads(out.read_text())
    summary = bench._stream_summary(results)
    assert summary["streams"] == 5 and summary["aborted"] == 0
    assert 0 < summary["ttfb_p50_ms"] <= summary["ttfb_p99_ms"]
    assert len(upstream.requests) == 5


def test_percentile() -> None:
    """Percentiles pick from the sorted values."""
    values = [float(v) for v in range(1, 101)]
    assert bench._percentile(values, 0.5) == 51
    assert bench._percentile(values, 0.99) == 100
