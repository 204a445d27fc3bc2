"""The bench's results: stream and phase summaries, medians of repeated runs,
the reports.

Pure functions over the results' dictionaries; nothing here starts or
measures a process.
"""

from __future__ import annotations

from typing import Any


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stream_summary(results: list[dict]) -> dict[str, Any]:
    ttfb = [r["ttfb_ms"] for r in results if r["ttfb_ms"] is not None]
    return {
        "streams": len(results),
        "aborted": sum(1 for r in results if not r["complete"]),
        "ttfb_p50_ms": round(_percentile(ttfb, 0.5), 2),
        "ttfb_p99_ms": round(_percentile(ttfb, 0.99), 2),
    }


def _phase_summary(samples: list[tuple[float, float, int]], start: float,
                   end: float) -> dict[str, Any]:
    """The requests in flight at some time between ``start`` and ``end``.

    Args:
        samples: Per request ``(start, seconds, status)``, on the clock of
            ``start`` and ``end``; status 0 for a failed connection.
        start: The phase's start.
        end: The phase's end.

    Returns:
        The phase's ``seconds``, its ``requests`` and ``errors`` (not 2xx),
        and the 2xx requests' latency ``p50_ms``, ``p99_ms`` and ``max_ms``.
    """
    inside = [(status, seconds) for began, seconds, status in samples
              if began < end and began + seconds > start]
    latencies = [1000 * seconds for status, seconds in inside if 200 <= status < 300]
    return {
        "seconds": round(end - start, 2),
        "requests": len(inside),
        "errors": len(inside) - len(latencies),
        "p50_ms": round(_percentile(latencies, 0.5), 2),
        "p99_ms": round(_percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
    }


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


#: The wrk scenarios' runs besides ``direct``: llmproxy with logs and
#: metrics on and off, and the twisted.web + Agent reference proxy.
PROXY_ON = "proxy (logs+metrics on)"
PROXY_OFF = "proxy (logs+metrics off)"
REFERENCE = "twisted.web+Agent reference"
#: How the ratio lines name llmproxy's variants.
_LLMPROXY = {PROXY_ON: "llmproxy (logs+metrics on)", PROXY_OFF: "llmproxy (logs+metrics off)"}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated wrk runs of one variant as its median run by req/s.

    Args:
        runs: The variant's runs, in the order they were made.

    Returns:
        The run with the median requests a second (the upper one of an
        even count), whole, with ``repeats``: how many runs there were, and
        with more than one ``requests_per_s_range``, ``[min, max]``.
    """
    ordered = sorted(runs, key=lambda run: run["requests_per_s"])
    median = dict(ordered[len(ordered) // 2], repeats=len(runs))
    if len(runs) > 1:
        median["requests_per_s_range"] = [ordered[0]["requests_per_s"],
                                          ordered[-1]["requests_per_s"]]
    return median


def _ratio(ours: float, theirs: float) -> float | None:
    """``ours / theirs`` to three decimals; None without a figure to divide by."""
    if not theirs > 0 or ours != ours:  # no requests, or NaN
        return None
    return round(ours / theirs, 3)


def reference_ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """llmproxy's wrk runs against the reference proxy's, as ratios.

    Args:
        runs: The runs by variant, each list in the order made: the
            variants alternate, so the n-th runs of each were made
            together.

    Returns:
        For :data:`PROXY_ON` and :data:`PROXY_OFF`: ``requests_per_s`` and
        ``p50_ms``, the variant's median run (:func:`median_run`) divided by
        the reference's (req/s above 1: llmproxy is faster; p50 below 1: it
        answers sooner), and ``requests_per_s_by_repeat``, each run's req/s
        divided by the reference run made with it.
    """
    reference = runs[REFERENCE]
    theirs = median_run(reference)
    ratios: dict[str, dict[str, Any]] = {}
    for name in (PROXY_ON, PROXY_OFF):
        ours = median_run(runs[name])
        ratios[name] = {
            "requests_per_s": _ratio(ours["requests_per_s"], theirs["requests_per_s"]),
            "p50_ms": _ratio(ours["p50_ms"], theirs["p50_ms"]),
            "requests_per_s_by_repeat": [
                _ratio(run["requests_per_s"], ref["requests_per_s"])
                for run, ref in zip(runs[name], reference)
            ],
        }
    return ratios


def _times(ratio: float | None) -> str:
    """A ratio as ``1.03x``, or ``-`` when there is none."""
    return "-" if ratio is None else f"{ratio:.2f}x"


def _reference_lines(reference: dict[str, Any] | None) -> list[str]:
    """The report's lines comparing llmproxy with the reference proxy."""
    if reference is None:  # results from before the reference
        return []
    if "skipped" in reference:
        return [f"no {REFERENCE} run: {reference['skipped']}"]
    lines = []
    for name, ratio in reference["ratios"].items():
        by_repeat = [r for r in ratio["requests_per_s_by_repeat"] if r is not None]
        spread = (f" (by repeat {_times(min(by_repeat))} to {_times(max(by_repeat))})"
                  if len(by_repeat) > 1 else "")
        lines.append(f"{_LLMPROXY[name]} / {REFERENCE} = "
                     f"{_times(ratio['requests_per_s'])} req/s{spread}, "
                     f"{_times(ratio['p50_ms'])} p50 latency")
    lines.append("(req/s above 1x: llmproxy is faster than the reference; p50 latency "
                 "below 1x: it answers sooner; medians of runs made in turn in this "
                 "sitting)")
    return lines


def _describe(python: dict[str, Any]) -> str:
    kind = {True: "shared libpython", False: "static libpython", None: "libpython unknown"}
    return f"python {python['version']} ({python['executable']}, {kind[python['libpython_shared']]})"


def _hostile_report(results: dict[str, Any]) -> str:
    """The ``hostile-body`` report: the load, the daemon's RSS, each
    phase's small requests, the stall and the bodies' own latency."""
    rss = results["rss"]
    since = ("with the bodies" if rss["peak_reset_after_warm_up"]
             else "since start (VmHWM could not be reset)")
    lines = [
        f"scenario hostile-body, {results['bodies']} bodies of {results['body_mib']} MiB "
        f"one after another ({results['objects_per_body']:,} empty objects each, model last"
        f"{', an alias the proxy rewrites' if results.get('alias') else ''}), "
        f"proxy pinned to one core: {results['pinned']}, upstream: {results['upstream']}, "
        f"{_describe(results['python'])}",
        f"daemon RSS: {rss['before_mb']} MB after warm-up, peak {rss['peak_mb']} MB {since} "
        f"(+{rss['growth_mb']} MB, {rss['growth_per_body_size']:g} times the "
        f"{results['body_mib']} MiB body), {rss['after_mb']} MB after them",
    ]
    for name, phase in results["runs"].items():
        lines.append(
            f"small requests, {name}: {phase['seconds']:g} s, {phase['requests']} requests, "
            f"{phase['errors']} errors, latency p50 {phase['p50_ms']:.2f} ms, "
            f"p99 {phase['p99_ms']:.2f} ms, max {phase['max_ms']:.2f} ms"
        )
    lines.append(f"stall other clients see: {results['stall_ms']:.2f} ms "
                 "(max latency with the bodies minus the baseline p50)")
    hostile = results["hostile_requests"]
    lines.append(
        "hostile requests: " + ", ".join(str(h["status"]) for h in hostile)
        + " in " + ", ".join(f"{h['latency_ms']:.1f}" for h in hostile) + " ms"
    )
    return "\n".join(lines)


def _limit_store(results: dict[str, Any]) -> str:
    """The rate-limit store a wrk scenario's proxy used, for its first line
    (and the budgeted key, with ``--budget``)."""
    store = results.get("limit_store", "none")
    budget = ", a budgeted key (a hold and a charge per request)" if results.get("budget") else ""
    if store == "none":
        return ("none (no rate limit" + (", budgets in the process" if budget else "")
                + ")" + budget)
    if store == "memory":
        return "memory (a rate limit in the process)" + budget
    redis = results.get("redis")
    where = f", redis {redis['version']} on 127.0.0.1:{redis['port']}" if redis else ""
    return f"{store} (a shared rate limit{where})" + budget


def per_cpu_second(requests_per_s: float, cpu_seconds: float, seconds: float) -> float | None:
    """Requests a second per proxy CPU-second a second: ``requests_per_s``
    divided by ``cpu_seconds / seconds``, the CPU the proxy's processes used
    together over a run of ``seconds``. None when no CPU was measured."""
    if not cpu_seconds > 0 or not seconds > 0:  # also NaN: a process was gone
        return None
    return round(requests_per_s * seconds / cpu_seconds, 1)


def _plural(count: int, noun: str, plural: str = "") -> str:
    """``1 core``, ``2 cores`` (or the ``plural`` given)."""
    return f"{count} " + (noun if count == 1 else plural or noun + "s")


def cores_note(cores: int, workers: int) -> str | None:
    """The report's warning when ``cores`` leave no core for the load beside
    ``workers`` proxy processes (then nothing is pinned); None otherwise."""
    if cores >= workers + 1:
        return None
    leave = "leaves" if workers == 1 else "leave"
    return (f"this machine has {_plural(cores, 'core')}: {_plural(workers, 'proxy worker')} "
            f"{leave} none for the load generator, so nothing is pinned and the load "
            "competes with the proxy for CPU; the per-CPU figures below are not comparable")


def _placement(results: dict[str, Any]) -> str:
    """Where a wrk scenario's proxy and load ran, for its first line."""
    if "proxy_cores" not in results:  # results from before --workers
        return f"proxy pinned to one core: {results['pinned']}"
    if results["proxy_cores"] is None:
        return f"nothing pinned ({_plural(results['cores'], 'core')})"
    return (f"proxy pinned to core{'s' * ('-' in results['proxy_cores'])} "
            f"{results['proxy_cores']}, load to core{'s' * ('-' in results['load_cores'])} "
            f"{results['load_cores']}")


def _optional(value: float | None, width: int) -> str:
    """A figure right-aligned, or ``-`` when there is none."""
    return f"{value:>{width}.0f}" if value is not None else f"{'-':>{width}}"


def _report(results: dict[str, Any]) -> str:
    if results["scenario"] == "hostile-body":
        return _hostile_report(results)
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
    workers = results.get("workers", 1)
    lines = [
        f"scenario {results['scenario']}, {_plural(workers, 'proxy worker')}, "
        f"limit store: {_limit_store(results)}, {results['connections']} connections, "
        f"{results['seconds']:g} s each, {_placement(results)}, "
        f"upstream: {results['upstream']}, {_describe(results['python'])}",
    ]
    if results.get("cores_note"):
        lines.append(f"note: {results['cores_note']}")
    lines.append(
        f"{'run':<28}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'CPU %':>7}{'RSS MB':>8}{'req/s/CPU-s':>13}"
    )
    for name, r in results["runs"].items():
        lines.append(
            f"{name:<28}{r['requests_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['errors']:>8}"
            f"{r.get('proxy_cpu_percent', float('nan')):>7.0f}"
            f"{r.get('proxy_peak_rss_mb', float('nan')):>8.1f}"
            f"{_optional(r.get('requests_per_proxy_cpu_second'), 13)}"
        )
    legend = "req/s/CPU-s: req/s per proxy CPU-second (req/s divided by the CPU-seconds a second "
    if workers == 1:
        legend += "the proxy's one process, twistd, used)"
    else:
        legend += (f"the proxy's {workers} processes used together: twistd and "
                   f"{_plural(workers - 1, 'worker')}); CPU % and RSS MB (peaks) are "
                   "summed over them too")
    lines.append(legend)
    lines.append(
        f"logging+metrics cost: {results['observability_cost_percent']}% of throughput"
    )
    lines += _reference_lines(results.get("reference"))
    if "redis" in results:
        redis = results["redis"]
        lines.append(
            f"redis ran the rate-limit script {redis['scripts']:,} times for "
            f"{redis['proxied_requests']:,} requests through the proxy "
            f"({redis['scripts_per_request']} a request; {redis['commands']:,} commands "
            "in all, those in the scripts included)"
        )
    direct = results["runs"]["direct"]["requests_per_s"]
    proxy = results["runs"][PROXY_ON]["requests_per_s"]
    if proxy and direct < 3 * proxy:
        lines.append(
            "note: the upstream is not 3x faster than the proxy here, so the proxy "
            "numbers are bounded by the upstream (compare on/off as a ratio only)"
        )
    return "\n".join(lines)
