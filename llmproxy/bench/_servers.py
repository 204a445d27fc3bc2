"""The servers the bench starts besides the load.

The upstream: nginx when installed (a canned completion, also to bodies of
any size, and with Debian's echo module SSE streams), else the package's
fake upstream. llmproxy itself,
a real ``twistd`` process, and its config. The references: nginx as a
plain streaming reverse proxy, which the stream scenarios compare the
proxy's CPU with, and the featureless twisted.web + Agent proxy of
:mod:`llmproxy.bench._reference`, which ``nonstream`` and ``sse`` compare
the proxy's throughput and latency with.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from llmproxy.bench._process import Cores, _pin, _start, _stop, _wait_listening


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


def _nginx_big_bodies(canned: str) -> tuple[str, str]:
    """nginx's modules line and location for ``hostile-body``: the canned
    completion for bodies of any size (nginx refuses bodies over 1 MiB by
    default), answered once the whole body is read, as a model API reads a
    prompt, when the echo module is there (``return`` answers at once and
    discards the body as it comes).

    The body is read into memory, of its own size: a temporary file would
    be the worker's, which (nginx started as root) runs as ``nobody`` and
    cannot write in the bench's private folder.
    """
    if not _ECHO_MODULE.exists():
        return "", "client_max_body_size 0;\n            " + canned
    lines = ["client_max_body_size 0;", "client_body_buffer_size 1024m;",
             "default_type application/json;", "echo_read_request_body;",
             f"echo -n '{_COMPLETION}';"]
    return f"load_module {_ECHO_MODULE};", "\n            ".join(lines)


def _nginx() -> str | None:
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _start_upstream(scenario: str, port: int, core: Cores, work: Path,
                    chunks: int = 20, delay: float = 0.0) -> subprocess.Popen:
    """nginx when installed (a canned completion, for ``hostile-body`` after
    bodies of any size; with the echo module also ``chunks`` SSE events
    ``delay`` s apart for streams), else the fake."""
    nginx = _nginx()
    streaming = scenario not in ("nonstream", "hostile-body")
    if nginx and (not streaming or _ECHO_MODULE.exists()):
        conf = work / "nginx.conf"
        if streaming:
            modules = f"load_module {_ECHO_MODULE};"
            location = _nginx_stream_location(chunks, delay)
        else:
            modules = ""
            location = f"default_type application/json;\n            return 200 '{_COMPLETION}';"
        if scenario == "hostile-body":
            modules, location = _nginx_big_bodies(location)
        conf.write_text(_NGINX.format(work=work, port=port, modules=modules, location=location))
        return _start([*_pin(core), nginx, "-c", str(conf), "-p", str(work)],
                      str(work), work / "upstream.log")
    return _start(
        [*_pin(core), sys.executable, "-m", "llmproxy.testing.upstream", "--port", str(port)],
        str(work), work / "upstream.log",
    )


def _start_proxy(work: Path, port: int, upstream_port: int, core: int | None,
                 extra: Sequence[str] = ()) -> subprocess.Popen:
    """llmproxy under twistd, logs and metrics on, listening on ``port``;
    ``extra`` are more lines of its config."""
    config = work / "proxy.yml"
    _proxy_config(config, port, upstream_port, True, extra)
    proxy = _start(
        [*_pin(core), sys.executable, "-c",
         "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "llmproxy", "--config", str(config)],
        str(work), work / "proxy.log",
    )
    _wait_listening(port, proxy, work / "proxy.log")
    time.sleep(0.5)  # a CLI tool letting the child settle before measuring
    return proxy


def _reference_argv(port: int, upstream_port: int, core: Cores) -> list[str]:
    """The command running the twisted.web + Agent reference proxy on
    ``port`` in front of the upstream, pinned to ``core`` as the proxy is,
    on the bench's own Python."""
    return [*_pin(core), sys.executable, "-m", "llmproxy.bench._reference",
            "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream_port}"]


def _proxy_config(path: Path, port: int, upstream: int, observability: bool,
                  extra: Sequence[str] = (), workers: int = 1) -> None:
    """Write the proxy's config: ``workers`` processes (``--workers``) on
    ``port``, logs and metrics on or off, ``extra`` lines after."""
    lines = [
        f'listen: "tcp:{port}:interface=127.0.0.1"',
        f'target_map: {{"/v1/": "http://127.0.0.1:{upstream}"}}',
        f"workers: {workers}",
    ]
    if observability:
        lines += ["admin_listen: null", "log: {file: logs/llmproxy.log, level: info}"]
    else:
        lines += ["admin_listen: null", "metrics: false",
                  "log: {file: null, access: false, level: warn}"]
    path.write_text("\n".join([*lines, *extra]) + "\n")
