"""The ``hostile-body`` scenario: what a huge body of tiny JSON objects costs.

The proxy reads a body's top-level ``model`` to route it. Building the
document for that once took the daemon from 66 MB to 923 MB and stalled
every other request for 1.2 s on a 32 MiB body of ``{}`` objects. This
scenario measures it on a real ``twistd`` process: while one keep-alive
connection sends small chat completions one after another, each timed,
another sends ``--bodies`` such bodies (``{"messages": [{}, {}, ...],
"model": "big-model"}``, ``--body-mib`` MiB, built once) one after another,
each of which must come back 2xx from the upstream through ``model_routes``.
It reports the daemon's RSS after a warm-up and its peak while the bodies
went through, the small requests' latency then and in a baseline phase as
long right after, and the bodies' own latency. Blocking by design, like the
rest of the bench.
"""

from __future__ import annotations

import argparse
import http.client
import threading
import time
from pathlib import Path
from typing import Any

from llmproxy.bench._process import (
    _free_port,
    _interpreter,
    _peak_rss_mb,
    _pinned,
    _reset_peak_rss,
    _rss_mb,
    _stop,
    _wait_listening,
)
from llmproxy.bench._report import _phase_summary
from llmproxy.bench._servers import _start_proxy, _start_upstream


#: The model the hostile bodies name: a key of the proxy's ``model_routes``.
HOSTILE_MODEL = "big-model"
#: With ``--alias``, the name the bodies give instead: an alias of
#: :data:`HOSTILE_MODEL`, which the proxy writes into each body.
HOSTILE_ALIAS = "big-alias"
#: The largest body ``--body-mib`` takes, in MiB.
MAX_BODY_MIB = 256
#: The most bodies ``--bodies`` takes.
MAX_BODIES = 20

_MIB = 1024 * 1024
_PATH = "/v1/chat/completions"
_HEAD = b'{"messages": ['
#: Small requests only, before the daemon's RSS is read (s).
_WARM_UP = 1.0
#: Between the last body's answer and the baseline phase (s).
_SETTLE = 0.5


def hostile_body(size: int, model: str = HOSTILE_MODEL) -> bytes:
    """A JSON body of exactly ``size`` bytes: as many empty objects as fit,
    then the top-level ``model`` last, so a reader must get past them all.

    Args:
        size: The body's length in bytes, at least 40.
        model: The model it names.

    Returns:
        ``{"messages": [{}, {}, ...], "model": "big-model"}``, padded with
        JSON whitespace before the ``]`` to the exact size.

    Raises:
        ValueError: ``size`` is too small for one object and the model.
    """
    tail = b'], "model": "' + model.encode("ascii") + b'"}'
    room = size - len(_HEAD) - len(tail)
    if room < 2:
        raise ValueError(f"a hostile body needs at least {len(_HEAD) + len(tail) + 2} bytes")
    objects = (room + 2) // 4  # "{}" and then ", {}" each
    items = b"{}" + b", {}" * (objects - 1)
    return b"".join([_HEAD, items, b" " * (room - len(items)), tail])


def _hostile_config(upstream_port: int, body_bytes: int, alias: bool = False) -> list[str]:
    """The proxy's config lines beyond the usual: a model route (so that it
    looks for ``model``), with ``alias`` an alias of it, and a body limit
    the bodies fit under."""
    lines = [
        f'model_routes: {{"{HOSTILE_MODEL}": "http://127.0.0.1:{upstream_port}"}}',
        f"max_body_bytes: {max(64 * _MIB, body_bytes + _MIB)}",
    ]
    if alias:
        lines.append(f'model_aliases: {{"{HOSTILE_ALIAS}": "{HOSTILE_MODEL}"}}')
    return lines


class _SmallRequests(threading.Thread):
    """Small chat completions one after another on one keep-alive
    connection until stopped, each recorded as ``(start, seconds, status)``
    (``time.monotonic``; status 0 when the connection failed)."""

    def __init__(self, port: int, body: bytes) -> None:
        super().__init__(name="bench-small-requests", daemon=True)
        self.port = port
        self.body = body
        self.samples: list[tuple[float, float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        """Send requests until :meth:`halt`."""
        headers = {"Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            while not self._halt.is_set():
                start = time.monotonic()
                try:
                    conn.request("POST", _PATH, self.body, headers)
                    response = conn.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException):
                    status = 0
                    conn.close()  # the next request reconnects
                self.samples.append((start, time.monotonic() - start, status))
                if status == 0:
                    self._halt.wait(0.01)  # no busy loop against a dead proxy
        finally:
            conn.close()

    def halt(self) -> None:
        """Stop after the request in flight, and wait for that."""
        self._halt.set()
        self.join(timeout=90)


def _send_hostile(port: int, body: bytes, count: int, proxy_log: Path) -> list[dict[str, Any]]:
    """Send ``count`` hostile bodies one after another on one connection.

    Returns:
        Per body: its ``status``, ``latency_ms`` (first byte sent to whole
        answer read), ``start`` and ``end`` (``time.monotonic``).

    Raises:
        SystemExit: A body got no answer or an answer that is not 2xx (a
        refused body measures nothing).
    """
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    sent: list[dict[str, Any]] = []
    try:
        for number in range(1, count + 1):
            start = time.monotonic()
            try:
                conn.request("POST", _PATH, body, headers)
                response = conn.getresponse()
                reply = response.read()
            except (OSError, http.client.HTTPException) as e:
                raise SystemExit(
                    f"bench: hostile body {number} got no answer ({e!r}); the proxy's log ends:\n"
                    + proxy_log.read_text(errors="replace")[-2000:]
                ) from None
            end = time.monotonic()
            if not 200 <= response.status < 300:
                raise SystemExit(f"bench: hostile body {number} got {response.status}, "
                                 f"not 2xx from the upstream: {reply[:300]!r}")
            sent.append({"status": response.status,
                         "latency_ms": round(1000 * (end - start), 1),
                         "start": start, "end": end})
    finally:
        conn.close()
    return sent


def _run_hostile(args: argparse.Namespace, work: Path, proxy_core: int | None,
                 other_core: int | None, chat: str) -> dict[str, Any]:
    """The ``hostile-body`` scenario; returns its results.

    The small requests run from before the warm-up to the end of the
    baseline phase, which starts :data:`_SETTLE` s after the last body's
    answer and lasts as long as the hostile phase did. A small request
    counts in each phase it was in flight during. The proxy's peak RSS is
    reset after the warm-up when Linux allows it, so it is the peak while
    the bodies went through.
    """
    alias = getattr(args, "alias", False)
    body = hostile_body(args.body_mib * _MIB, HOSTILE_ALIAS if alias else HOSTILE_MODEL)
    results: dict[str, Any] = {
        "scenario": args.scenario,
        "alias": alias,
        "pinned": proxy_core is not None,
        "python": _interpreter(),
        "body_mib": args.body_mib,
        "body_bytes": len(body),
        "objects_per_body": body.count(b"{}"),
        "bodies": args.bodies,
        "runs": {},
    }
    upstream_port = _free_port()
    upstream = _start_upstream(args.scenario, upstream_port, other_core, work)
    results["upstream"] = "nginx" if "nginx" in str(upstream.args) else "fake upstream"
    try:
        _wait_listening(upstream_port, upstream, work / "upstream.log")
        port = _free_port()
        proxy = _start_proxy(work, port, upstream_port, proxy_core,
                             _hostile_config(upstream_port, len(body), alias))
        try:
            # The load runs beside the upstream, never on the proxy's core.
            with _pinned(other_core):
                small = _SmallRequests(port, chat.encode("utf-8"))
                small.start()
                try:
                    time.sleep(_WARM_UP)  # a CLI tool letting the load warm up
                    before = _rss_mb(proxy.pid)
                    reset = _reset_peak_rss(proxy.pid)
                    hostile = _send_hostile(port, body, args.bodies, work / "proxy.log")
                    peak, after = _peak_rss_mb(proxy.pid), _rss_mb(proxy.pid)
                    start, end = hostile[0]["start"], hostile[-1]["end"]
                    baseline_start = end + _SETTLE
                    baseline_end = baseline_start + (end - start)
                    # A CLI tool waiting out the baseline phase.
                    time.sleep(max(0.0, baseline_end - time.monotonic()))
                finally:
                    small.halt()
        finally:
            _stop(proxy)
    finally:
        _stop(upstream)
    results["rss"] = {
        "before_mb": round(before, 1),
        "peak_mb": round(peak, 1),
        "after_mb": round(after, 1),
        "growth_mb": round(peak - before, 1),
        "growth_per_body_size": round((peak - before) / args.body_mib, 2),
        "peak_reset_after_warm_up": reset,
    }
    baseline = _phase_summary(small.samples, baseline_start, baseline_end)
    during = _phase_summary(small.samples, start, end)
    results["runs"]["baseline"] = baseline
    results["runs"]["hostile bodies"] = during
    results["stall_ms"] = round(during["max_ms"] - baseline["p50_ms"], 2)
    results["hostile_requests"] = [
        {"status": h["status"], "latency_ms": h["latency_ms"]} for h in hostile
    ]
    return results
