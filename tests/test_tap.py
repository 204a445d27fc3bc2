"""The twistd plugin: discovery, options, services, and real twistd runs."""

from __future__ import annotations

import gzip
import json
import os
import resource
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import IService, IServiceCollection, IServiceMaker
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ProcessProtocol
from twisted.plugin import getPlugins

from helpers import NeedleWaiter, collect, send
from raw_http import Peer, http
from llmproxy import daemon, tap
from llmproxy.config import parse_config_text
from llmproxy.workers import main_process

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0
#: Runs twistd with this interpreter (what the `twistd` script does).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(path: Path, port: int, demo_port: int, extra: str = "") -> Path:
    """Write a config serving 127.0.0.1:port, routing /v1/ to a demo upstream.

    Args:
        path: The file to write.
        port: The proxy's port.
        demo_port: The in-process demo upstream's port.
        extra: More YAML (defaults to no admin listener unless it names one).

    Returns:
        ``path``.
    """
    admin = "" if "admin_listen" in extra else "admin_listen: null\n"
    path.write_text(
        f'listen: "tcp:{port}:interface=127.0.0.1"\n'
        f'demo_upstream: "tcp:{demo_port}:interface=127.0.0.1"\n'
        f'target_map:\n  "/v1/": "http://127.0.0.1:{demo_port}"\n' + admin + extra
    )
    return path


def test_plugin_is_found() -> None:
    """twistd finds the llmproxy plugin, and it points at llmproxy.tap."""
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    assert "llmproxy" in makers
    assert makers["llmproxy"].module == "llmproxy.tap"


def test_no_init_above_the_dropin() -> None:
    """twisted/ and twisted/plugins/ must stay namespace folders."""
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()


def test_options_default_config_path() -> None:
    """--config defaults to etc/config.yml."""
    assert dict((p[0], p[2]) for p in tap.Options.optParameters)["config"] == "etc/config.yml"


def test_make_service_builds_the_service_tree(tmp_path: Path) -> None:
    """makeService returns the listener, the pool closer and the demo upstream."""
    path = tmp_path / "demo.yml"
    path.write_text((ROOT / "etc" / "demo.yml").read_text())
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    service = tap.makeService(options)
    assert IServiceCollection.providedBy(service)
    names = [s.name for s in service]
    assert names == ["log-file", "demo-upstream", "gateway", "web", "admin"]
    assert all(IService.providedBy(s) for s in service)


def test_without_demo_upstream_no_demo_service() -> None:
    """The production config starts no fake upstream."""
    from twisted.internet import reactor

    config = parse_config_text((ROOT / "etc" / "config.yml").read_text(), environ={})
    names = [s.name for s in main_process(config, reactor, None)]
    assert names == ["log-file", "gateway", "web", "admin"]


def test_bad_config_is_one_line_exit(tmp_path: Path) -> None:
    """A config mistake exits with one line naming the key, no traceback."""
    path = tmp_path / "bad.yml"
    path.write_text("target_map:\n  /v1/: ftp://example.test\n")
    with pytest.raises(SystemExit) as raised:
        tap.Options().parseOptions(["--config", str(path)])
    message = str(raised.value.code)
    assert message.startswith("llmproxy: config error: target_map")
    assert "not an http(s) URL" in message
    assert "\n" not in message


def test_bad_listen_endpoint_is_one_line_exit() -> None:
    """An endpoint string Twisted cannot parse names the listen key."""
    from twisted.internet import reactor

    config = parse_config_text(
        'listen: "bogus:8000"\ntarget_map: {"/": "http://127.0.0.1:1"}\n', environ={}
    )
    with pytest.raises(SystemExit) as raised:
        main_process(config, reactor, None)
    assert str(raised.value.code).startswith("llmproxy: config error: listen: ")


class Twistd(ProcessProtocol, NeedleWaiter):
    """A twistd child process whose output (stdout and stderr) we watch."""

    def __init__(self) -> None:
        NeedleWaiter.__init__(self)
        self.ended: Deferred[int | str] = Deferred()

    @property
    def output(self) -> bytes:
        return bytes(self.received)

    def outReceived(self, data: bytes) -> None:
        self.feed(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.fail_waits(AssertionError(f"twistd ended early:\n{self.output.decode()}"))
        value = reason.value
        self.ended.callback(
            value.exitCode if value.exitCode is not None else f"signal {value.signal}"
        )


def spawn_twistd(
    reactor: Any, config: Path, cwd: Path, argv: list[str] | None = None,
    twistd: list[str] = TWISTD,
) -> Twistd:
    """Start ``twistd -n llmproxy --config CONFIG`` (or ``argv``) from here."""
    process = Twistd()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    # Run this source tree (its dropin and package), installed or not.
    env["PYTHONPATH"] = str(ROOT)
    reactor.spawnProcess(
        process,
        sys.executable,
        [*twistd, *(argv or ["-n", "--pidfile=", "llmproxy", "--config", str(config)])],
        env=env,
        path=str(cwd),
    )
    return process


async def terminate(process: Twistd, reactor: Any) -> int | str:
    """SIGTERM a twistd child and wait for its exit status (its output, as
    the failure, if it does not end in time)."""
    process.transport.signalProcess("TERM")
    try:
        return await process.ended.addTimeout(WAIT, reactor)
    except TimeoutError:
        raise AssertionError(process.output.decode()[-4000:]) from None


async def kill_if_running(process: Twistd, reactor: Any) -> None:
    """SIGKILL a twistd child a failed test left running."""
    if not process.ended.called:
        process.transport.signalProcess("KILL")
        await process.ended.addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_a_stream_and_stops_on_sigterm(
    reactor: Any, tmp_path: Path, client: Any
) -> None:
    """A real twistd: serves the demo config, streams, exits 0 on SIGTERM."""
    port, demo_port = free_port(), free_port()
    config = demo_config(tmp_path / "demo.yml", port, demo_port)
    process = spawn_twistd(reactor, config, tmp_path)
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        response = await send(
            client, reactor, f"http://127.0.0.1:{port}/v1/chat/completions",
            {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert response.code == 200
        body = await collect(response).done.addTimeout(WAIT, reactor)
        events = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        assert json.loads(events[1][6:])["choices"][0]["delta"]["content"]
        # A client that asks for the connection to close (on the daemon's own
        # loop, which closes it without another poll) has the whole stream first.
        peer = Peer(reactor)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer)
        ask = json.dumps({"model": "demo", "stream": True,
                          "messages": [{"role": "user", "content": "Bye"}]}).encode()
        reply = await peer.exchange(http(b"POST", b"/v1/chat/completions", ask,
                                         b"Content-Type: application/json",
                                         b"Connection: close"))
        assert reply.status == 200 and reply.header(b"connection") == b"close"
        assert reply.body.endswith(b"data: [DONE]\n\n")
        await peer.wait_closed()
        assert peer.unread() == b"" and peer.reason.check(ConnectionDone)
    finally:
        if not process.ended.called:
            process.transport.signalProcess("TERM")
        code = await process.ended.addTimeout(WAIT, reactor)
    # twistd re-raises the signal it stopped on; systemd counts SIGTERM as
    # a clean exit. (Exit status 0 after a graceful drain: protection issue.)
    assert code in (0, "signal 15"), process.output.decode()
    assert b"Server Shut Down." in process.output
    assert b"Traceback" not in process.output


@pytest_twisted.ensureDeferred
async def test_twistd_bad_config_exits_nonzero_with_one_line(
    reactor: Any, tmp_path: Path
) -> None:
    """twistd with a bad config prints one line naming the key and exits 1."""
    config = tmp_path / "bad.yml"
    config.write_text("port: 70000\ntarget_map: {'/v1/': 'http://127.0.0.1:1'}\n")
    process = spawn_twistd(reactor, config, tmp_path)
    code = await process.ended.addTimeout(WAIT, reactor)
    assert code != 0
    text = process.output.decode().strip()
    assert text == "llmproxy: config error: port: port out of range (1-65535): 70000 (line 1, column 1)"


@pytest_twisted.ensureDeferred
async def test_twistd_port_in_use_fails_clearly(
    reactor: Any, tmp_path: Path
) -> None:
    """A port that is taken stops startup with a non-zero exit."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "taken.yml"
        config.write_text(
            f'listen: "tcp:{port}:interface=127.0.0.1"\n'
            "target_map: {'/v1/': 'http://127.0.0.1:1'}\nadmin_listen: null\n"
        )
        process = spawn_twistd(reactor, config, tmp_path)
        code = await process.ended.addTimeout(WAIT, reactor)
    assert code != 0
    assert b"Address already in use" in process.output


def test_twistd_help_lists_llmproxy() -> None:
    """`twistd --help` lists the llmproxy command of the installed package.

    Run from / so that only what pip installed is importable.
    """
    result = subprocess.run(
        [*TWISTD, "--help"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert result.returncode == 0
    assert "llmproxy" in result.stdout


def test_wheel_holds_exactly_the_dropin(tmp_path: Path) -> None:
    """The wheel ships one file under twisted/: the dropin, no dropin.cache."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = tmp_path.glob("llmproxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("twisted/")] == [
        "twisted/plugins/llmproxy_plugin.py"
    ]
    assert "llmproxy/testing/upstream.py" in names


@pytest_twisted.ensureDeferred
async def test_secrets_never_reach_logs_stdout_or_metrics(
    reactor: Any, tmp_path: Path, client: Any
) -> None:
    """Planted credentials appear nowhere: log file, stdout or /metrics."""
    port, admin_port, demo_port = free_port(), free_port(), free_port()
    config = demo_config(
        tmp_path / "secrets.yml", port, demo_port,
        f'admin_listen: "tcp:{admin_port}:interface=127.0.0.1"\n'
        'proxy_url: "http://user:PLANTED-PROXY-PW@127.0.0.1:9"\n'
        "log: {level: debug, max_bytes: 4000, backups: 50}\n",
    )
    secrets = {
        "Authorization": "Bearer PLANTED-AUTH",
        "X-Api-Key": "PLANTED-XKEY",
        "Api-Key": "PLANTED-APIKEY",
        "Cookie": "session=PLANTED-COOKIE",
        "Proxy-Authorization": "Basic PLANTED-PROXYAUTH",
    }
    process = spawn_twistd(reactor, config, tmp_path)
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        base = f"http://127.0.0.1:{port}"
        chat = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}]}
        for extra in ({}, {"X-Fake-Status": "500"}, {"X-Fake-Abort-After": "1"}):
            response = await send(client, reactor, base + "/v1/chat/completions", chat,
                                  headers={**secrets, **extra})
            try:
                await collect(response).done.addTimeout(WAIT, reactor)
            except Exception:
                pass  # the aborted one
        response = await send(client, reactor, base + "/nowhere", chat, headers=secrets)
        await collect(response).done.addTimeout(WAIT, reactor)
        response = await send(client, reactor, f"http://127.0.0.1:{admin_port}/metrics",
                              method=b"GET")
        metrics = await collect(response).done.addTimeout(WAIT, reactor)
        assert b"llmproxy_requests_total" in metrics
    finally:
        if not process.ended.called:
            process.transport.signalProcess("TERM")
        await process.ended.addTimeout(WAIT, reactor)
    logs = b""
    for path in (tmp_path / "logs").iterdir():
        data = path.read_bytes()
        logs += gzip.decompress(data) if path.suffix == ".gz" else data
    assert logs.count(b'"log_namespace": "llmproxy.access"') == 4
    for where, text in (("log file", logs), ("stdout", process.output), ("/metrics", metrics)):
        assert b"PLANTED" not in text, f"a secret reached the {where}"


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_streams_finish_then_exits_0(
    reactor: Any, tmp_path: Path, client: Any
) -> None:
    """SIGTERM: stop accepting, finish the stream in flight, exit status 0."""
    port, demo_port = free_port(), free_port()
    config = demo_config(tmp_path / "graceful.yml", port, demo_port, "shutdown_grace: 20\n")
    process = spawn_twistd(reactor, config, tmp_path)
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        response = await send(
            client, reactor, f"http://127.0.0.1:{port}/v1/chat/completions",
            {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
            headers={"X-Fake-Chunks": "8", "X-Fake-Chunk-Delay": "0.25"},
        )
        body = collect(response)
        await body.first.addTimeout(WAIT, reactor)
        process.transport.signalProcess("TERM")
        await process.wait_for(b"waiting up to 20").addTimeout(WAIT, reactor)
        # The listener was closed before that line was logged.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        full = await body.done.addTimeout(WAIT, reactor)
        assert full.rstrip().endswith(b"data: [DONE]")
        code = await process.ended.addTimeout(WAIT, reactor)
    finally:
        if not process.ended.called:
            process.transport.signalProcess("KILL")
            await process.ended.addTimeout(WAIT, reactor)
    assert code == 0, process.output.decode()


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_a_valid_config_and_refuses_a_bad_one(
    reactor: Any, tmp_path: Path, client: Any
) -> None:
    """SIGHUP applies a valid config to new requests; a bad one changes nothing."""
    port, demo_port = free_port(), free_port()
    config = tmp_path / "reload.yml"

    def write(keys: str, extra: str = "") -> None:
        demo_config(config, port, demo_port, f"auth: {{keys: [{keys}]}}\n" + extra)

    async def status(key: str) -> int:
        response = await send(client, reactor, f"http://127.0.0.1:{port}/v1/models",
                              method=b"GET", headers={"Authorization": f"Bearer {key}"})
        await collect(response).done.addTimeout(WAIT, reactor)
        return response.code

    write("old-key")
    process = spawn_twistd(reactor, config, tmp_path)
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        assert (await status("old-key"), await status("new-key")) == (200, 401)
        write("new-key")
        process.transport.signalProcess("HUP")
        await process.wait_for(b"config reloaded").addTimeout(WAIT, reactor)
        assert (await status("old-key"), await status("new-key")) == (401, 200)
        write("other-key", "tagret_map: {}\n")
        process.transport.signalProcess("HUP")
        await process.wait_for(b"config reload refused").addTimeout(WAIT, reactor)
        assert b"tagret_map: unknown key; did you mean 'target_map'?" in process.output
        assert (await status("new-key"), await status("other-key")) == (200, 401)
    finally:
        if not process.ended.called:
            process.transport.signalProcess("TERM")
        code = await process.ended.addTimeout(WAIT, reactor)
    assert code == 0, process.output.decode()


#: twistd as started from a shell whose soft open-file limit is 64 (the
#: hard limit unchanged).
LOW_LIMIT_TWISTD = [
    sys.executable, "-c",
    "import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)); "
    "from twisted.scripts.twistd import run; run()",
]


@pytest_twisted.ensureDeferred
async def test_twistd_raises_a_low_open_file_limit(
    reactor: Any, tmp_path: Path, client: Any
) -> None:
    """Started with a soft limit of 64 open files, the daemon raises it to
    the hard limit and says so, on the console and in its log file: it
    then holds 100 idle client connections and still answers a request
    (at 64 it would refuse connections)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < daemon.ENOUGH_OPEN_FILES:
        pytest.skip(f"the hard open-file limit here is {hard}: the daemon would warn")
    port, demo_port = free_port(), free_port()
    config = demo_config(tmp_path / "demo.yml", port, demo_port,
                         "log: {file: logs/llmproxy.log}\n")
    process = spawn_twistd(reactor, config, tmp_path, twistd=LOW_LIMIT_TWISTD)
    idle: list[socket.socket] = []
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        await process.wait_for(b"open-file limit raised from 64 to ").addTimeout(WAIT, reactor)
        assert b"the open-file limit is" not in process.output  # no warning
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        response = await send(
            client, reactor, f"http://127.0.0.1:{port}/v1/chat/completions",
            {"model": "demo", "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert response.code == 200
        assert (await collect(response).done.addTimeout(WAIT, reactor)).startswith(b"{")
    finally:
        for connection in idle:
            connection.close()
        if not process.ended.called:
            process.transport.signalProcess("TERM")
        await process.ended.addTimeout(WAIT, reactor)
    assert b"Traceback" not in process.output
    events = [json.loads(line) for line in
              (tmp_path / "logs" / "llmproxy.log").read_text().splitlines()]
    raised = [e for e in events if e.get("log_format", "").startswith("open-file limit raised")]
    assert len(raised) == 1 and raised[0]["soft"] == 64 and raised[0]["target"] > 64


def test_a_low_hard_open_file_limit_is_raised_to_and_warned_about() -> None:
    """With a hard limit of 2,048 the soft one goes up to it, and the log
    warns that about 1,024 streams fit, naming what to raise."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 2048))\n"
        "from twisted.logger import globalLogBeginner, textFileLogObserver\n"
        "globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])\n"
        "from twisted.internet.epollreactor import EPollReactor\n"
        "from llmproxy import daemon\n"
        "daemon._raise_open_file_limit(EPollReactor())\n"
        "print('limits', resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=WAIT, check=True).stdout
    assert "open-file limit raised from 64 to 2048" in out
    assert "the open-file limit is 2048: each stream in flight holds two, so about 1024" in out
    assert "LimitNOFILE=" in out
    assert "limits (2048, 2048)" in out


def test_open_file_limit_stays_for_a_select_reactor() -> None:
    """select() cannot watch descriptors past 1,024: under a select-based
    reactor (Twisted's select reactor, a subclass of it, or its threaded
    one) the limit is left as it is.

    The threaded reactor's module is private: it is told by its module's
    name, so a stand-in class from that module plays it here.
    """
    from twisted.internet.selectreactor import SelectReactor

    class MySelectReactor(SelectReactor):
        """A reactor derived from the select reactor."""

    ThreadedSelectReactor = type(
        "ThreadedSelectReactor", (), {"__module__": "twisted.internet._threadedselect"}
    )
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        for reactor in (SelectReactor(), MySelectReactor(), ThreadedSelectReactor()):
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, before[1]))
            daemon._raise_open_file_limit(reactor)
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
