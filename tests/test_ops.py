"""Operations: --check, systemd units, running from a .tac file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
import yaml

from twisted.internet.protocol import ProcessProtocol

from helpers import NeedleWaiter, collect, send
from test_tap import (
    TWISTD, WAIT, demo_config, free_port, kill_if_running, spawn_twistd, terminate,
)

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
proxy_url: "http://user:s3cret-proxy@proxy.example:3128"
target_map:
  /v1/: {urls: [https://api.openai.com/v1], api_key: sk-live-upstream}
auth: {keys: [client-secret-key, {key: team-secret-key, name: team-a, budget: 1000/day}]}
rate_limit: {rate: 5, store: "redis://:s3cret-redis@127.0.0.1:6399/0"}
"""


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """Run ``twistd llmproxy --config FILE --check``."""
    config = tmp_path / "config.yml"
    config.write_text(text)
    return subprocess.run(
        [*TWISTD, "llmproxy", "--config", str(config), "--check"],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_check_prints_the_effective_config_redacted(tmp_path: Path) -> None:
    """--check: exit 0, every key with its default, no secret in sight."""
    result = check(tmp_path, GOOD)
    assert result.returncode == 0, result.stderr
    for secret in ("s3cret-proxy", "sk-live-upstream", "client-secret-key", "team-secret-key",
                   "s3cret-redis"):
        assert secret not in result.stdout + result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["proxy_url"] == "http://user:***@proxy.example:3128"
    assert effective["target_map"]["/v1/"]["api_key"] == "***"
    assert effective["auth"]["keys"] == [
        "***",
        {"key": "***", "name": "team-a", "budget": {"tokens": 1000, "per": "day", "reserve": 4096},
         "models": None, "rate_limit": None},
    ]
    assert effective["rate_limit"]["store"] == "redis://:***@127.0.0.1:6399/0"
    assert effective["shutdown_grace"] == 30.0
    assert effective["listen"] == "tcp:8000:backlog=1024"
    assert not (tmp_path / "logs").exists(), "--check must not start anything"


def test_check_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    """--check on a bad config: exit 1 and the key, nothing else."""
    result = check(tmp_path, GOOD.replace("auth:", "auht:"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "llmproxy: config error: auht: unknown key; did you mean 'auth'? (known keys: "
        + result.stderr.split("(known keys: ", 1)[1].strip()
    )
    assert "\n" not in result.stderr.strip()


def verify_units(tmp_path: Path, *units: str) -> None:
    """Run systemd-analyze verify on unit files, twistd at this venv's path."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "install Debian's systemd package (for systemd-analyze)"
    twistd = Path(sys.executable).parent / "twistd"
    for unit in units:
        text = (ROOT / "etc/systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/llmproxy/bin/twistd", str(twistd)))
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / unit) for unit in units)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_units_verify(tmp_path: Path) -> None:
    """The unit files pass systemd-analyze verify."""
    service = (ROOT / "etc/systemd/llmproxy.service").read_text()
    assert "/opt/llmproxy/bin/twistd -n --pidfile= llmproxy --config" in service
    verify_units(tmp_path, "llmproxy.service", "llmproxy.socket")


def test_documented_verify_works_on_a_fresh_clone(tmp_path: Path) -> None:
    """docs/operations.md's verify command for a clone (no /opt/llmproxy yet)
    passes, run as written from a clone with the quick start's .venv."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "install Debian's systemd package (for systemd-analyze)"
    text = (ROOT / "docs/operations.md").read_text()
    commands = [
        line.strip() for line in text.splitlines()
        if line.startswith("    ") and "mktemp" in line and "systemd-analyze verify" in line
    ]
    assert len(commands) == 1, commands
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "etc").symlink_to(ROOT / "etc")
    (clone / ".venv").symlink_to(Path(sys.executable).parent.parent)
    result = subprocess.run(
        ["bash", "-c", commands[0]], cwd=str(clone), capture_output=True, text=True,
        timeout=60, env={"PATH": f"{Path(analyze).parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_tac_file_with_make_service(reactor: Any, tmp_path: Path, client: Any) -> None:
    """A .tac file built on llmproxy.tap.makeService runs under twistd -y."""
    port, demo_port = free_port(), free_port()
    config = demo_config(tmp_path / "config.yml", port, demo_port)
    tac = tmp_path / "llmproxy.tac"
    tac.write_text(
        "from twisted.application import service\n"
        "from llmproxy import tap\n"
        "options = tap.Options()\n"
        f"options.parseOptions(['--config', {str(config)!r}])\n"
        "application = service.Application('llmproxy')\n"
        "tap.makeService(options).setServiceParent(application)\n"
    )
    process = spawn_twistd(reactor, config, tmp_path, argv=["-n", "--pidfile=", "-y", str(tac)])
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        response = await send(client, reactor, f"http://127.0.0.1:{port}/v1/models",
                              method=b"GET")
        await collect(response).done.addTimeout(WAIT, reactor)
        assert response.code == 200
        process.transport.signalProcess("TERM")
        code = await process.ended.addTimeout(WAIT, reactor)
    finally:
        if not process.ended.called:
            process.transport.signalProcess("KILL")
            await process.ended.addTimeout(WAIT, reactor)
    assert code == 0, process.output.decode()


def _access_counts(tmp_path: Path, needle: str = '"log_namespace": "llmproxy.access"') -> list[int]:
    """How often ``needle`` is in worker 1's and worker 2's log files."""
    return [
        path.read_text().count(needle) if path.exists() else 0
        for path in (tmp_path / "logs/llmproxy.log", tmp_path / "logs/llmproxy-worker2.log")
    ]


async def _until_both_workers_serve(
    reactor: Any, tmp_path: Path, one: Any,
    needle: str = '"log_namespace": "llmproxy.access"',
) -> list[int]:
    """Send rounds of 40 concurrent requests with ``one()`` (each returning
    its status) until both workers' logs hold ``needle``; their counts."""
    from twisted.internet.defer import gatherResults

    for _ in range(5):
        codes = await gatherResults(
            [Deferred.fromCoroutine(one()) for _ in range(40)]
        ).addTimeout(WAIT, reactor)
        assert set(codes) == {200}
        counts = _access_counts(tmp_path, needle)
        if all(counts):
            break
    return counts


@pytest_twisted.ensureDeferred
async def test_two_workers_share_one_port(reactor: Any, tmp_path: Path) -> None:
    """workers: 2 serves one port from two processes; SIGTERM stops both, exit 0."""
    from twisted.web.client import Agent, HTTPConnectionPool

    port, demo_port = free_port(), free_port()
    config = demo_config(tmp_path / "config.yml", port, demo_port, "workers: 2\n")
    process = spawn_twistd(reactor, config, tmp_path)
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    try:
        await process.wait_for(b"worker 2 serving").addTimeout(WAIT, reactor)
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)

        async def one() -> int:
            response = await send(agent, reactor, f"http://127.0.0.1:{port}/v1/models",
                                  method=b"GET")
            await collect(response).done.addTimeout(WAIT, reactor)
            return response.code

        counts = await _until_both_workers_serve(reactor, tmp_path, one)
        assert all(counts), f"both workers served: {counts}"
        worker2 = (tmp_path / "logs/llmproxy-worker2.log").read_text()
        assert '"worker": 2' in worker2
        # SIGHUP reaches both workers: each logs its reload.
        config.write_text(config.read_text() + "max_retry_wait: 1\n")
        process.transport.signalProcess("HUP")
        await process.wait_for(b"config reloaded", count=2).addTimeout(WAIT, reactor)
        code = await terminate(process, reactor)
    finally:
        await kill_if_running(process, reactor)
    assert code == 0, process.output.decode()
    assert b"worker 2 ended" in process.output


@pytest_twisted.ensureDeferred
async def test_every_worker_reads_the_proxy_protocol_header(
    reactor: Any, tmp_path: Path
) -> None:
    """workers: 2 on a ``haproxy:`` listener: both workers read the PROXY
    header a balancer sends, and log the client it names."""
    from helpers import raw_connect

    port, demo_port = free_port(), free_port()
    config = demo_config(tmp_path / "config.yml", port, demo_port, "workers: 2\n")
    config.write_text(config.read_text().replace('listen: "tcp:', 'listen: "haproxy:tcp:'))
    process = spawn_twistd(reactor, config, tmp_path)
    try:
        await process.wait_for(b"worker 2 serving").addTimeout(WAIT, reactor)
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)

        async def one() -> int:
            peer = await raw_connect(
                reactor, f"http://127.0.0.1:{port}",
                b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n"
                b"GET /v1/models HTTP/1.1\r\nHost: llmproxy\r\nConnection: close\r\n\r\n",
            )
            await peer.closed.addTimeout(WAIT, reactor)
            return int(peer.received[9:12])

        counts = await _until_both_workers_serve(
            reactor, tmp_path, one, '"client_ip": "203.0.113.7"'
        )
        assert all(counts), f"both workers served, each naming the client: {counts}"
        code = await terminate(process, reactor)
    finally:
        await kill_if_running(process, reactor)
    assert code == 0, process.output.decode()


def test_systemd_template_unit_verifies(tmp_path: Path) -> None:
    """The llmproxy@.service template passes systemd-analyze verify too."""
    assert "Sockets=llmproxy.socket" in (ROOT / "etc/systemd/llmproxy@.service").read_text()
    verify_units(tmp_path, "llmproxy@.service", "llmproxy.service", "llmproxy.socket")


#: Sets LISTEN_PID to its own pid (as systemd does) and becomes twistd.
ACTIVATE = (
    "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
    "os.execv(sys.executable, [sys.executable, '-c', "
    "'from twisted.scripts.twistd import run; run()'] + sys.argv[1:])"
)


class _Child(ProcessProtocol, NeedleWaiter):
    """A child process whose output we watch."""

    def __init__(self) -> None:
        NeedleWaiter.__init__(self)
        self.ended: Deferred[Any] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.feed(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.fail_waits(AssertionError(bytes(self.received).decode()))
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_socket_activation_with_two_instances(reactor: Any, tmp_path: Path) -> None:
    """listen: systemd:... serves a socket handed over as systemd does, and
    two instances can share it; SIGTERM stops each with status 0."""
    import os
    import socket

    from twisted.web.client import Agent, HTTPConnectionPool

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    port = listening.getsockname()[1]
    children = []
    try:
        for instance in (1, 2):
            folder = tmp_path / f"i{instance}"
            folder.mkdir()
            config = folder / "config.yml"
            config.write_text(
                'listen: "systemd:domain=INET:index=0"\n'
                'target_map: {"/v1/": "http://127.0.0.1:1"}\n'
                "admin_listen: null\n"
            )
            child = _Child()
            env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
            env.update(PYTHONPATH=str(ROOT), LISTEN_FDS="1", LISTEN_FDNAMES="llmproxy.socket")
            reactor.spawnProcess(
                child, sys.executable,
                [sys.executable, "-c", ACTIVATE, "-n", "--pidfile=", "llmproxy",
                 "--config", str(config)],
                env=env, path=str(folder), childFDs={0: "w", 1: "r", 2: "r", 3: listening.fileno()},
            )
            children.append(child)
            await child.wait_for(b"LLMProxySite starting on %d" % port).addTimeout(WAIT, reactor)
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await send(agent, reactor, f"http://127.0.0.1:{port}/healthz", method=b"GET")
        await collect(response).done.addTimeout(WAIT, reactor)
        assert response.code == 200
        for child in children:
            child.transport.signalProcess("TERM")
        codes = [await child.ended.addTimeout(WAIT, reactor) for child in children]
    finally:
        listening.close()
        for child in children:
            if not child.ended.called:
                child.transport.signalProcess("KILL")
                await child.ended.addTimeout(WAIT, reactor)
    assert codes == [0, 0]


def test_check_reports_every_mistake_with_its_line_and_column(tmp_path: Path) -> None:
    """Three mistakes, one --check run: three lines, each naming the key
    path, its line and column, with today's hints; exit status 1. A
    mistake that only follows from another (a misspelt ``urls`` is then
    missing) is not reported again."""
    result = check(tmp_path, (
        "port: 70000\n"
        "target_map:\n"
        '  "/v1/": {url: "http://127.0.0.1:9"}\n'
        "rate_limit:\n"
        "  rate: 5\n"
        "  burst: 0\n"
        "model_aliass: {}\n"
    ))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[3].startswith(
        "llmproxy: config error: model_aliass: unknown key; did you mean "
        "'model_aliases'? (known keys: port, listen, proxy_url, "
    ) and lines[3].endswith(", stream_usage) (line 7, column 1)")
    assert lines[:3] == [
        "llmproxy: config error: port: port out of range (1-65535): 70000 (line 1, column 1)",
        'llmproxy: config error: target_map["/v1/"].url: unknown key; did you mean '
        "'urls'? (known keys: urls, via, api_key, auth_header, strategy, retries, "
        "retry_on, eject_after, cooldown, stream_usage) (line 3, column 12)",
        "llmproxy: config error: rate_limit.burst: must be at least 1, got 0 "
        "(line 6, column 3)",
    ]
    assert len(lines) == 4


def test_check_warns_about_a_version_segment_given_twice(tmp_path: Path) -> None:
    """A route whose key and URL both end in /v1 (and a model route whose
    URL ends in the /v1 a target_map prefix starts with) is valid, with a
    warning each on --check: requests would go to .../v1/v1/..."""
    result = check(tmp_path, (
        'target_map: {"/v1/": "https://api.openai.com/v1"}\n'
        'model_routes: {"deepseek-chat": "https://api.deepseek.com/v1"}\n'
    ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# {tmp_path / 'config.yml'}: valid, 2 warning(s)\n")
    assert result.stderr.splitlines() == [
        'llmproxy: config warning: target_map["/v1/"]: the path and the URL '
        "'https://api.openai.com/v1' both end in /v1: requests under '/v1/' go to "
        "https://api.openai.com/v1/v1/..., with /v1 twice; leave /v1 out of the URL",
        "llmproxy: config warning: model_routes.deepseek-chat: the URL "
        "'https://api.deepseek.com/v1' ends in /v1, and requests under '/v1/' keep "
        "theirs: they go to https://api.deepseek.com/v1/v1/...; leave /v1 out of the URL",
    ]
