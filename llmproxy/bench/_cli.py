"""The bench's command line: ``python -m llmproxy.bench [options]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from llmproxy.bench._hostile import MAX_BODIES, MAX_BODY_MIB
from llmproxy.bench._limitstore import LIMIT_STORES
from llmproxy.bench._process import _raise_open_file_limit
from llmproxy.bench._report import _report
from llmproxy.bench._scenarios import run
from llmproxy.bench._streams import OPEN_STREAMS


#: The most events per stream ``--chunks`` takes (a 500 s stream in
#: ``streams``; nginx's config has a line per event).
MAX_CHUNKS = 1000


def _whole_number(highest: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to ``highest``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= highest:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from 1 to {highest}, got {text!r}")
        return value

    return parse


#: Events per stream, 1 to :data:`MAX_CHUNKS`.
_chunks = _whole_number(MAX_CHUNKS)

#: The most proxy processes ``--workers`` takes.
MAX_WORKERS = 64


#: The scenarios ``--limit-store`` and ``--workers`` apply to (wrk's,
#: through the proxy).
_LIMITED_SCENARIOS = ("nonstream", "sse")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line's options, checked; a usage error (exit 2) if wrong."""
    from llmproxy import bench  # its docstring is the --help text

    parser = argparse.ArgumentParser(prog="python -m llmproxy.bench", description=bench.__doc__)
    parser.add_argument(
        "--scenario",
        choices=("nonstream", "sse", "streams", "streams-fast", "idle", "hostile-body"),
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
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="nonstream and sse: skip the runs through the twisted.web + "
                             "Agent reference proxy (made with one proxy worker) and the "
                             "ratios to it")
    parser.add_argument("--chunks", type=_chunks, default=20,
                        help="streams and streams-fast: content events per stream (default "
                             "20); streams start less often as they get longer, so about "
                             f"{OPEN_STREAMS:,} stay open")
    parser.add_argument("--body-mib", type=_whole_number(MAX_BODY_MIB), default=32,
                        metavar="MIB",
                        help=f"hostile-body: each body's size in MiB, 1 to {MAX_BODY_MIB} "
                             "(default 32)")
    parser.add_argument("--alias", action="store_true",
                        help="hostile-body: the bodies name an alias of the routed model "
                        "(model_aliases), so the proxy writes the model into each")
    parser.add_argument("--bodies", type=_whole_number(MAX_BODIES), default=3,
                        help=f"hostile-body: bodies sent one after another, 1 to "
                             f"{MAX_BODIES} (default 3)")
    parser.add_argument("--limit-store", choices=LIMIT_STORES, default="none",
                        help="nonstream and sse: the proxy's rate limit (one that never "
                             "refuses): none (default), memory (in the process) or redis "
                             "(a local redis-server the bench starts)")
    parser.add_argument("--budget", action="store_true",
                        help="nonstream and sse: every request comes with a client key "
                             "whose token budget no load spends, so each holds what it may "
                             "cost and settles it, in the --limit-store store")
    parser.add_argument("--workers", type=_whole_number(MAX_WORKERS), default=1, metavar="N",
                        help="nonstream and sse: the proxy's processes (its config's "
                             f"workers), 1 to {MAX_WORKERS} (default 1), pinned to cores "
                             "0..N-1, the load to the others")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    scenarios = " and ".join(_LIMITED_SCENARIOS)
    if args.limit_store != "none" and args.scenario not in _LIMITED_SCENARIOS:
        parser.error(f"argument --limit-store: {args.limit_store} applies to the "
                     f"{scenarios} scenarios only, not {args.scenario}")
    if args.budget and args.scenario not in _LIMITED_SCENARIOS:
        parser.error(f"argument --budget applies to the {scenarios} scenarios only, "
                     f"not {args.scenario}")
    if args.workers != 1 and args.scenario not in _LIMITED_SCENARIOS:
        parser.error(f"argument --workers: {args.workers} workers apply to the "
                     f"{scenarios} scenarios only, not {args.scenario}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    args = _parse_args(argv)
    _raise_open_file_limit()
    results = run(args)
    print(_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
