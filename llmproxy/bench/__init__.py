"""A benchmark: ``python -m llmproxy.bench``.

Starts an upstream (nginx when installed: a canned completion, and with
Debian's echo module SSE streams; else the package's fake upstream) and
llmproxy (a real ``twistd`` process), drives load with ``wrk`` (Debian
package ``wrk``) or the stream generator ``llmproxy.bench._streamload``,
and reports requests/s, latency or time to first byte for the same load
straight to the upstream and through the proxy (with logging and metrics
on, and for wrk's scenarios also off). For ``streams`` and
``streams-fast`` the same load also runs through nginx as a plain streaming
proxy when nginx is installed: the CPU a C proxy needs on this machine at
this moment.

For ``nonstream`` and ``sse`` the same load also runs through a featureless
twisted.web + Agent proxy (``llmproxy.bench._reference``: one leaf resource
forwarding every request over a persistent ``HTTPConnectionPool`` with
llmproxy's pool settings and streaming the response back, no logging, no
metrics, no routing, no limits), as its own process on the proxy's core,
the same reactor (epoll) and the same Python: what Twisted itself costs on
this machine at this moment. Its runs alternate with the proxy's (on, off,
reference, ``--repeat`` times), and the report gives llmproxy's median
req/s and p50 latency as ratios to the reference's (``llmproxy
(logs+metrics on) / twisted.web+Agent reference = 1.03x req/s``), and with
repeats the range of the ratios of runs made together; the JSON has them
under ``reference``. ``--no-reference`` skips it; with ``--workers`` above
1 it is skipped too (it is one process), and the report says so.

``--limit-store`` (``nonstream`` and ``sse``) gives the proxy a rate limit
that never refuses (10**6 requests a second, as many of burst), to show
what the check costs a request: ``none`` (the default) sets no limit,
``memory`` keeps it in the proxy's process, ``redis`` in a shared store, a
``redis-server`` (Debian package ``redis-server``) the bench starts on a
free loopback port and stops at the end. With ``redis`` each proxy run
starts once the proxy's store connection is up, and the bench fails unless
Redis ran the rate-limit script for at least 90 % of the requests wrk
counted (the proxy lets requests through while its store is down); the
report gives the scripts and commands Redis ran. The report's first line
and the JSON (``limit_store``, ``redis``) name the store. ``--budget`` (the
same scenarios) sends every request with a client key whose token budget no
load spends, so that each request holds what it may cost at admission and
settles it when it ends, in the ``--limit-store`` store (with ``none``, in
the proxy's process without a rate limit): what a budget costs a request
(``budget`` in the JSON).

``hostile-body`` measures what a huge body of tiny JSON objects costs the
daemon, whose routing reads the body's top-level ``model`` (the config
routes ``big-model`` by ``model_routes``). While one keep-alive connection
sends small chat completions one after another, each timed, another sends
``--bodies`` (default 3) bodies ``{"messages": [{}, {}, ...], "model":
"big-model"}`` of ``--body-mib`` (default 32, at most 256) MiB one after
another; each must come back 2xx from the upstream. It reports the daemon's
RSS after a warm-up and its peak while the bodies went through (growth in
MB and as a multiple of the body size), the small requests' latency p50,
p99 and max with the bodies and in a baseline phase as long right after,
the stall other clients see (that max minus the baseline p50) and the
bodies' own latency. With ``--alias`` the bodies name an alias of
``big-model`` (``model_aliases``), so the proxy also writes the model into
each. It runs no wrk and ignores ``--connections``,
``--duration`` and ``--repeat``.

``--workers N`` (``nonstream`` and ``sse``; 1 to 64, default 1) gives the
proxy's config ``workers: N``: twistd and N-1 ``python -m llmproxy.workers``
children serving its one listening socket. The proxy is pinned to cores
0..N-1 (twistd under ``taskset``; its children inherit that), wrk and the
upstream to the other cores. Each proxy run starts once all N processes are
up and idle; its CPU % and peak RSS are summed over them, and the report
adds req/s per proxy CPU-second: requests a second divided by the
CPU-seconds a second those processes used together, the figure to compare
across worker counts. A machine with fewer than N + 1 cores leaves no core
for the load: the bench still runs, pins nothing, and says in the report
(and in the JSON: ``per_cpu_comparable`` false, ``cores_note``) that the
per-CPU figures are not comparable. The report's first line and the JSON
(``workers``, ``cores``, ``proxy_cores``, ``load_cores``) name the workers
and where everything ran.

Otherwise, with two or more cores the proxy is pinned to core 0 and
everything else to core 1. Every child runs on the
bench's own Python, which the report names: the interpreter's build
matters (see the README's Performance section).

This is a command-line tool, not part of the daemon: it blocks, waits on
child processes and is never imported by the proxy.
"""

# The modules, by concern (this docstring is also the --help text):
#   _cli        the command line (main)
#   _scenarios  run, and the wrk scenarios (nonstream, sse) with their runs
#   _streams    the stream scenarios (streams, streams-fast, idle)
#   _hostile    the hostile-body scenario: its bodies, its two clients, its phases
#   _limitstore --limit-store: the proxy's rate-limit config, a local redis-server
#   _servers    the upstream, llmproxy under twistd, the reference proxies' commands
#   _reference  the twisted.web + Agent reference proxy, run as a child process
#   _process    child processes, ports, CPU and memory from /proc, the interpreter
#   _report     stream summaries, medians of repeated runs, the text report
#   _streamload the stream load generator, run as a child process

from __future__ import annotations

from llmproxy.bench._cli import MAX_CHUNKS, main
from llmproxy.bench._process import cpu_seconds
from llmproxy.bench._scenarios import CHAT, run
from llmproxy.bench._streams import MAX_STREAM_RATE, OPEN_STREAMS

__all__ = ["CHAT", "MAX_CHUNKS", "MAX_STREAM_RATE", "OPEN_STREAMS", "cpu_seconds", "main", "run"]
