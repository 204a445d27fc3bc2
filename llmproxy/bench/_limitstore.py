"""The rate-limit store of ``nonstream`` and ``sse`` (``--limit-store``).

``none`` configures no rate limit (the bench as it always was). ``memory``
and ``redis`` configure a limit that never refuses (:data:`NEVER_REFUSES`
tokens a second, as many of burst), kept in the proxy's process or in a
``redis-server`` the bench starts on a free loopback port, in a folder of
its own, saving nothing: what is measured is the check every request makes,
not refusals. With Redis the bench also checks that the store really took
part: before each proxy run it sends requests until Redis has run the
proxy's rate-limit script (the proxy's store connection is up), and after
it, that Redis ran a script for at least :data:`MIN_SEEN` of the requests
wrk counted (``on_store_error: allow`` would otherwise let a proxy whose
store is down measure nothing, silently).

Redis is asked over a plain socket speaking RESP (``INFO all``): blocking by
design, like the rest of the bench, never imported by the daemon.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Iterator

from llmproxy.bench._process import Cores, _free_port, _pin, _start, _stop

#: The ``--limit-store`` choices; ``none`` is the default.
LIMIT_STORES = ("none", "memory", "redis")
#: Tokens a second and burst: a limit no bench load reaches.
NEVER_REFUSES = 1_000_000
#: The least share of wrk's requests Redis must have run a script for.
MIN_SEEN = 0.9
#: Redis's script commands, counted in ``INFO commandstats``.
_SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro")


#: The bench's budgeted client key (``--budget``), and a budget no load spends.
BUDGET_KEY = "bench-budget-key"
BUDGET_TOKENS = 10 ** 15


def limit_config(store: str, redis_port: int | None = None, budget: bool = False) -> list[str]:
    """The proxy's config lines for a ``--limit-store`` choice (and ``--budget``).

    Args:
        store: ``none``, ``memory`` or ``redis``.
        redis_port: The local Redis's port (``redis`` only).
        budget: Whether every request comes with :data:`BUDGET_KEY`, a named
            key with a token budget no load spends: each request then holds
            what it may cost at admission and settles it at its end, in the
            store (``none``: in the process, with no rate limit).

    Returns:
        No line for ``none`` without a budget; else a ``rate_limit`` line
        that never refuses, with ``store`` the local Redis's database 0 for
        ``redis``, and with ``budget`` an ``auth`` line.

    Raises:
        ValueError: An unknown store, or ``redis`` without a port.
    """
    lines = []
    if budget:
        lines.append(
            f'auth: {{keys: [{{key: "{BUDGET_KEY}", name: bench, '
            f"budget: {{tokens: {BUDGET_TOKENS}, per: month}}}}]}}"
        )
    if store == "none":
        return lines
    limit = f"rate: {NEVER_REFUSES}, burst: {NEVER_REFUSES}"
    if store == "memory":
        return [*lines, f"rate_limit: {{{limit}}}"]
    if store == "redis" and redis_port is not None:
        return [*lines, f'rate_limit: {{{limit}, store: "redis://127.0.0.1:{redis_port}/0"}}']
    raise ValueError(f"no config for limit store {store!r} (redis port {redis_port})")


def _encode(words: tuple[str, ...]) -> bytes:
    """A RESP command: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode("utf-8")
        parts += [b"$%d\r\n" % len(data), data, b"\r\n"]
    return b"".join(parts)


def _read_reply(stream: IO[bytes]) -> bytes:
    """One RESP reply that is a simple string, integer or bulk string.

    Raises:
        OSError: The connection ended early, Redis answered with an error,
            or with a reply of another kind.
    """
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("redis closed the connection before answering")
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b":"):
        return rest
    if kind == b"-":
        raise OSError("redis answered: " + rest.decode("utf-8", "replace"))
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return b""
        data = stream.read(size + 2)
        if len(data) != size + 2:
            raise OSError("redis closed the connection in a reply")
        return data[:-2]
    raise OSError(f"unexpected reply from redis: {line[:60]!r}")


def _redis_command(port: int, *words: str) -> bytes:
    """Send one command to the Redis on 127.0.0.1:``port``; its reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as conn:
        conn.sendall(_encode(words))
        with conn.makefile("rb") as stream:
            return _read_reply(stream)


def _parse_info(text: str) -> dict[str, str]:
    """``INFO``'s ``field:value`` lines as a dict (section heads dropped)."""
    fields = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            name, value = line.split(":", 1)
            fields[name] = value.strip()
    return fields


def _script_calls(info: dict[str, str]) -> int:
    """How many scripts Redis ran (EVAL and EVALSHA calls), from ``INFO``."""
    total = 0
    for command in _SCRIPT_COMMANDS:
        stats = dict(
            item.split("=", 1)
            for item in info.get(f"cmdstat_{command}", "").split(",") if "=" in item
        )
        total += int(stats.get("calls", 0))
    return total


def _redis_counts(port: int) -> tuple[int, int]:
    """``(scripts run, commands processed)`` so far by the Redis on ``port``."""
    info = _parse_info(_redis_command(port, "INFO", "all").decode("utf-8", "replace"))
    return _script_calls(info), int(info.get("total_commands_processed", 0))


def _wait_redis(port: int, process: subprocess.Popen, log: Path,
                tries: int = 200, step: float = 0.05) -> str:
    """Wait until the Redis on ``port`` answers PING; return its version.

    Raises:
        SystemExit: It exited, or did not answer after ``tries`` connects
            ``step`` s apart.
    """
    for _ in range(tries):
        if process.poll() is not None:
            raise SystemExit(
                f"bench: redis-server exited early (status {process.returncode}):\n"
                + log.read_text(errors="replace")[-2000:]
            )
        try:
            if _redis_command(port, "PING") == b"PONG":
                info = _redis_command(port, "INFO", "server").decode("utf-8", "replace")
                return _parse_info(info).get("redis_version", "unknown")
        except OSError:
            pass
        time.sleep(step)  # a CLI tool waiting for a child process
    raise SystemExit(f"bench: redis-server did not answer on port {port} "
                     f"after {tries} tries {step:g} s apart")


def redis_server() -> str | None:
    """The ``redis-server`` program, if installed."""
    found = shutil.which("redis-server")
    return found or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


@contextlib.contextmanager
def local_redis(work: Path, core: Cores) -> Iterator[dict[str, Any]]:
    """A ``redis-server`` on a free loopback port for the ``with`` block.

    It runs pinned to ``core`` (a core or a CPU list), in ``work``/redis,
    saving nothing, and is stopped when the block ends, also on errors.

    Yields:
        ``{"port": ..., "version": ...}``.

    Raises:
        SystemExit: redis-server is not installed or does not answer.
    """
    binary = redis_server()
    if binary is None:
        raise SystemExit("bench: redis-server is not installed (apt-get install redis-server)")
    folder = work / "redis"
    folder.mkdir()
    port, log = _free_port(), work / "redis.log"
    process = _start(
        [*_pin(core), binary, "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(folder), "--save", "", "--appendonly", "no"],
        str(folder), log,
    )
    try:
        yield {"port": port, "version": _wait_redis(port, process, log)}
    finally:
        _stop(process)


def await_store(redis_port: int, proxy_port: int, path: str, body: str, log: Path,
                tries: int = 50, budget: bool = False) -> int:
    """Send requests through the proxy until Redis runs its rate-limit script.

    The proxy connects to its store in the background and lets requests
    through while it is not connected yet: a run started before then
    would measure some requests without the store.

    Returns:
        The scripts Redis has run so far: the count the run starts from.

    Raises:
        SystemExit: No script after ``tries`` requests 0.1 s apart.
    """
    before = _redis_counts(redis_port)[0]
    headers = {"Content-Type": "application/json"}
    if budget:
        headers["Authorization"] = f"Bearer {BUDGET_KEY}"
    for _ in range(tries):
        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
        try:
            conn.request("POST", path, body.encode("utf-8"), headers)
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        scripts = _redis_counts(redis_port)[0]
        if scripts > before:
            return scripts
        time.sleep(0.1)  # a CLI tool waiting for the proxy's store connection
    raise SystemExit(
        f"bench: after {tries} requests through the proxy, Redis on port {redis_port} "
        "has run no rate-limit script: the proxy is not using it as its store "
        "(check rate_limit.store); the proxy's log ends:\n"
        + log.read_text(errors="replace")[-2000:]
    )


def check_seen(requests: int, scripts: int) -> None:
    """Fail unless Redis ran a script for (nearly) every request wrk counted.

    Args:
        requests: The requests wrk completed through the proxy.
        scripts: The rate-limit scripts Redis ran meanwhile.

    Raises:
        SystemExit: Redis ran none, or fewer than :data:`MIN_SEEN` of
            ``requests``: the proxy let requests through without the store
            (``on_store_error: allow``), so the run measured no shared limit.
    """
    if scripts == 0:
        raise SystemExit(
            f"bench: Redis saw none of the {requests:,} requests through the proxy: "
            "the run measured no shared limit (was the store down or misconfigured?)")
    if scripts < MIN_SEEN * requests:
        raise SystemExit(
            f"bench: Redis ran the rate-limit script for only {scripts:,} of the "
            f"{requests:,} requests through the proxy (less than {MIN_SEEN:.0%}): the "
            "store was down or timing out for part of the run, so it measured a "
            "mix; see the proxy's log")


def seen_summary(redis: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the local Redis saw over every proxy run, for the results.

    Args:
        redis: ``{"port": ..., "version": ...}`` from :func:`local_redis`.
        runs: The proxy runs, each with wrk's ``requests`` and Redis's
            ``redis_scripts`` and ``redis_commands``.
    """
    requests = sum(run["requests"] for run in runs)
    scripts = sum(run["redis_scripts"] for run in runs)
    return {
        "version": redis["version"],
        "port": redis["port"],
        "proxied_requests": requests,
        "scripts": scripts,
        "commands": sum(run["redis_commands"] for run in runs),
        "scripts_per_request": round(scripts / requests, 3) if requests else None,
    }
