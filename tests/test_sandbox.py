"""The systemd unit's sandbox, for real: the daemon under the shipped unit's
own seccomp rules serves an https upstream.

``systemd-analyze verify`` (tests/test_ops.py) checks the unit's syntax; it
cannot see what the sandbox does to the process. Here ``sandbox_exec.py``,
run by Debian's ``/usr/bin/python3`` with ``python3-seccomp``, reads the
unit file, applies the seccomp filters systemd 252 derives from it
(``MemoryDenyWriteExecute=``, ``SystemCallFilter=``,
``RestrictAddressFamilies=`` and the rest), no_new_privs, the capability
bounding set and the umask, and execs twistd; a real client then asks for
an https upstream behind the test CA. These tests skip only when
``/usr/bin/python3`` cannot import ``seccomp`` or the kernel has no seccomp
filters; the README's test command installs ``python3-seccomp``, and
``.ci/run`` makes them fail instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.web.client import Agent, HTTPConnectionPool

from certs import issue, make_ca, write_pem
from helpers import collect, fetch, header, send
from llmproxy.testing.upstream import REPLY_TEXT, FakeUpstream
from sandbox_exec import (
    APPLIED, NOT_APPLIED, SECCOMP_HALF, UNAVAILABLE, service_settings, unknown_keys,
)
from test_egress import tls_upstream  # noqa: F401 (the https fake upstream, from pki)
from test_tap import TWISTD, WAIT, Twistd, free_port, kill_if_running, terminate

ROOT = Path(__file__).resolve().parent.parent
#: Debian's Python, the one with ``python3-seccomp``.
SYSTEM_PYTHON = "/usr/bin/python3"
LAUNCHER = Path(__file__).resolve().with_name("sandbox_exec.py")
UNITS = ("llmproxy.service", "llmproxy@.service")


def unit_text(name: str = "llmproxy.service", extra: str = "", drop: tuple[str, ...] = ()) -> str:
    """A shipped unit file, with ``extra`` lines added to ``[Service]`` and
    the lines setting the keys in ``drop`` left out."""
    lines = [
        line for line in (ROOT / "etc/systemd" / name).read_text().splitlines()
        if line.split("=", 1)[0] not in drop
    ]
    at = lines.index("[Install]")
    return "\n".join(lines[:at] + extra.splitlines() + lines[at:]) + "\n"


def sandbox_unavailable() -> str | None:
    """Why the sandbox cannot be applied on this machine, or None."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"no {SYSTEM_PYTHON} (Debian's Python, for python3-seccomp)"
    result = subprocess.run(
        [SYSTEM_PYTHON, str(LAUNCHER), "--probe"], capture_output=True, text=True, timeout=60,
    )
    if result.returncode == UNAVAILABLE:
        return result.stdout.strip()
    assert result.returncode == 0, result.stdout + result.stderr
    return None


@pytest.fixture(scope="module")
def sandbox() -> None:
    """Skip unless seccomp filters can be applied here (fail instead where
    ``LLMPROXY_REQUIRE_SANDBOX`` is set, as ``.ci/run`` does)."""
    reason = sandbox_unavailable()
    if reason and os.environ.get("LLMPROXY_REQUIRE_SANDBOX"):
        pytest.fail(f"seccomp sandbox unavailable: {reason}")
    if reason:
        pytest.skip(f"seccomp sandbox unavailable: {reason}")


def sandboxed(unit: Path, argv: list[str], mdwe: str = "seccomp") -> subprocess.CompletedProcess:
    """Run ``argv`` under ``unit``'s sandbox and wait for it (60 s at most)."""
    return subprocess.run(
        [SYSTEM_PYTHON, str(LAUNCHER), f"--mdwe={mdwe}", str(unit), "--", *argv],
        capture_output=True, text=True, timeout=60,
    )


def test_every_service_setting_is_applied_or_classified() -> None:
    """The launcher knows every [Service] setting of both units, and the
    template is hardened exactly as the service is.

    A setting added to a unit must be applied by ``sandbox_exec.py`` or
    listed there as not sandboxing or as needing systemd itself.
    """
    hardening = {}
    for name in UNITS:
        # An instance's folders are the service's, one level down.
        text = (ROOT / "etc/systemd" / name).read_text().replace("/%i", "")
        settings = service_settings(text)
        assert unknown_keys(settings) == [], f"{name}: teach tests/sandbox_exec.py these"
        hardening[name] = {
            key: value for key, value in settings.items()
            if key in APPLIED or key in SECCOMP_HALF or key in NOT_APPLIED
        }
        assert settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "no", (
            f"{name}: pyOpenSSL's callbacks need write+execute memory for every TLS connection"
        )
    assert hardening["llmproxy.service"] == hardening["llmproxy@.service"]


def test_service_settings_read_as_systemd_reads_them() -> None:
    """Comments, other sections, repeats and continuation lines."""
    settings = service_settings(
        "[Unit]\nDescription=x\n[Service]\n# MemoryDenyWriteExecute=yes\n"
        "; LockPersonality=yes\nRestrictAddressFamilies=AF_INET \\\n  AF_UNIX\n"
        "RestrictAddressFamilies=AF_INET6\nUMask=0077\n[Install]\nWantedBy=x\n"
    )
    assert settings == {
        "RestrictAddressFamilies": ["AF_INET    AF_UNIX", "AF_INET6"], "UMask": ["0077"],
    }


#: Run by the venv's Python, in and out of the sandbox: what each rule
#: answered. Harmless unsandboxed: the calls change nothing outside this
#: process (a real-time policy with priority 0 and a host name longer
#: than any are invalid).
RULES = r"""
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    fn = getattr(libc, name)
    return "ok" if fn(*args) >= 0 else errno.errorcode[ctypes.get_errno()]
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
path = sys.argv[1]
open(path, "w").close()
print(json.dumps({
    "AF_INET": attempt(lambda: socket.socket(socket.AF_INET).close()),
    "AF_UNIX": attempt(lambda: socket.socket(socket.AF_UNIX).close()),
    "AF_NETLINK": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
    "unshare_user": call("unshare", 0x10000000),
    "clone3": call("syscall", 435, None, 0),
    "personality_linux32": call("personality", 0x0008),
    "sched_fifo": attempt(lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(0))),
    "chmod_setuid": attempt(lambda: os.chmod(path, 0o4700)),
    "sethostname": call("sethostname", b"x", 1 << 20),
    "syslog": call("klogctl", 10, None, 0),
    "adjtimex": call("adjtimex", None),
}))
"""

#: The same, under the whole unit: the process state, then a call outside
#: ``@system-service``.
STATE_THEN_OUTSIDE = r"""
import ctypes, json, os
libc = ctypes.CDLL(None)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({
    "no_new_privs": libc.prctl(39, 0, 0, 0, 0),
    "umask": oct(os.umask(0)),
    "bounding_set": status["CapBnd"].strip(),
}), flush=True)
libc.adjtimex(None)
print("still running")
"""


def test_the_launcher_applies_the_unit_sandbox(sandbox: None, tmp_path: Path) -> None:
    """What sandbox_exec.py applies is in force in the program it runs.

    Each rule is seen with ``SystemCallFilter=`` left out (with it, a call
    outside ``@system-service`` kills the process before its own rule
    could answer) and ``CapabilityBoundingSet=`` too (as root, a call then
    fails for the rule, not for want of a capability). Under the whole
    unit: no_new_privs, the umask, no capability, and a call outside the
    set kills the process (SIGSYS), as under systemd.
    """
    unit = tmp_path / "unit.service"
    unit.write_text(unit_text(drop=("SystemCallFilter", "CapabilityBoundingSet")))
    argv = [sys.executable, "-c", RULES, str(tmp_path / "f")]
    result = sandboxed(unit, argv)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = {
        "AF_INET": "ok",
        "AF_UNIX": "ok",
        "AF_NETLINK": "EAFNOSUPPORT",
        "unshare_user": "EPERM",
        "clone3": "ENOSYS",
        "personality_linux32": "EPERM",
        "sched_fifo": "EPERM",
        "chmod_setuid": "EPERM",
        "sethostname": "EPERM",
        "syslog": "EPERM",
        "adjtimex": "EPERM",
    }
    assert json.loads(result.stdout) == expected
    # Out of the sandbox each call answers otherwise, bar those a container
    # without the capability refuses anyway (outside the initial user
    # namespace: sethostname and syslog want CAP_SYS_ADMIN, CAP_SYSLOG).
    outside = json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout)
    same = {key for key, value in expected.items() if value != "ok" and outside[key] == value}
    assert same <= {"sethostname", "syslog"}, outside
    unit.write_text(unit_text())
    result = sandboxed(unit, [sys.executable, "-c", STATE_THEN_OUTSIDE])
    assert result.returncode == -signal.SIGSYS, result.stdout + result.stderr
    state = json.loads(result.stdout)
    assert state["no_new_privs"] == 1 and state["umask"] == "0o77"
    if os.geteuid() == 0:
        assert state["bounding_set"] == "0" * 16
    assert "still running" not in result.stdout


@pytest.mark.parametrize("mdwe", ["seccomp", "prctl"])
def test_the_launcher_applies_memory_deny_write_execute(
    sandbox: None, tmp_path: Path, mdwe: str
) -> None:
    """With ``MemoryDenyWriteExecute=yes`` no memory is writable and
    executable at once: what cffi's ``ffi.callback`` asks for.

    ``seccomp`` is systemd 252's way (EPERM), ``prctl`` the PR_SET_MDWE of
    systemd 254 and later on Linux 6.3 and later (EACCES).
    """
    unit = tmp_path / "unit.service"
    unit.write_text(unit_text(extra="MemoryDenyWriteExecute=yes"))
    result = sandboxed(unit, [sys.executable, "-c", (
        "import mmap\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "except OSError as e:\n"
        "    print(e.strerror)\n"
        "import cffi\n"
        "try:\n"
        "    cffi.FFI().callback('int(int)', lambda x: x)\n"
        "except MemoryError as e:\n"
        "    print(e)\n"
    )], mdwe=mdwe)
    if result.returncode == UNAVAILABLE:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr
    refused, callback = result.stdout.splitlines()
    assert refused == ("Operation not permitted" if mdwe == "seccomp" else "Permission denied")
    assert callback.startswith("Cannot allocate write+execute memory for ffi.callback()")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    """A CA, its file, and a certificate for localhost and 127.0.0.1 (what
    ``tls_upstream`` serves)."""
    ca = make_ca()
    cert, key = issue(ca, ["localhost", "127.0.0.1"])
    return {"cert": cert, "key": key, "ca_file": write_pem(tmp_path / "ca.pem", ca.cert_pem)}


async def start_sandboxed(
    reactor: Any, tmp_path: Path, unit: str, config: str, port: int, mdwe: str = "seccomp"
) -> Twistd:
    """Start ``twistd -n llmproxy`` under ``unit``'s sandbox and wait until
    it listens on ``port``.

    Args:
        reactor: The reactor.
        tmp_path: The working directory (logs land here).
        unit: The unit file's text.
        config: The llmproxy config's text.
        port: The port the config listens on.
        mdwe: How MemoryDenyWriteExecute= is enforced (see sandbox_exec.py).

    Returns:
        The running process.
    """
    (tmp_path / "unit.service").write_text(unit)
    (tmp_path / "config.yml").write_text(config)
    process = Twistd()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = str(ROOT)
    argv = [
        SYSTEM_PYTHON, str(LAUNCHER), f"--mdwe={mdwe}", str(tmp_path / "unit.service"), "--",
        *TWISTD, "-n", "--pidfile=", "llmproxy", "--config", str(tmp_path / "config.yml"),
    ]
    reactor.spawnProcess(process, SYSTEM_PYTHON, argv, env=env, path=str(tmp_path))
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
    except AssertionError:  # it ended
        if await process.ended == UNAVAILABLE:
            pytest.skip(process.output.decode().strip())
        raise
    except TimeoutError:
        await kill_if_running(process, reactor)
        raise AssertionError(f"not listening:\n{process.output.decode()}") from None
    return process


def https_config(port: int, upstream_port: int, ca_file: str) -> str:
    """A config routing /v1/ to the upstream by address, /v1/embeddings by name."""
    return (
        f'listen: "tcp:{port}:interface=127.0.0.1"\n'
        "admin_listen: null\n"
        "target_map:\n"
        f'  "/v1/": "https://127.0.0.1:{upstream_port}"\n'
        f'  "/v1/embeddings": "https://localhost:{upstream_port}"\n'
        f"tls: {{ca_file: {json.dumps(ca_file)}}}\n"
    )


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


@pytest_twisted.ensureDeferred
async def test_https_upstream_under_the_unit_sandbox(
    reactor: Any, sandbox: None, tmp_path: Path, client: Any, pki: dict[str, Any],
    tls_upstream: tuple[FakeUpstream, int],
) -> None:
    """The daemon under the shipped unit's seccomp rules answers from an
    https upstream: a JSON reply, a streamed (SSE) one, and an upstream
    reached by host name (resolved without AF_NETLINK)."""
    upstream, upstream_port = tls_upstream
    port = free_port()
    process = await start_sandboxed(
        reactor, tmp_path, unit_text(), https_config(port, upstream_port, pki["ca_file"]), port,
    )
    try:
        response, body = await fetch(
            client, reactor, f"http://127.0.0.1:{port}/v1/chat/completions", CHAT,
        )
        assert response.code == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == REPLY_TEXT
        assert [r.uri for r in upstream.requests] == [b"/v1/chat/completions"]

        response = await send(
            client, reactor, f"http://127.0.0.1:{port}/v1/chat/completions",
            {**CHAT, "stream": True},
        )
        assert response.code == 200
        assert header(response, "content-type").startswith("text/event-stream")
        stream = await collect(response).done.addTimeout(WAIT, reactor)
        events = [line[6:] for line in stream.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        text = "".join(
            choice["delta"].get("content") or ""
            for event in events[:-1] for choice in json.loads(event)["choices"]
        )
        assert text == REPLY_TEXT

        response, body = await fetch(
            client, reactor, f"http://127.0.0.1:{port}/v1/embeddings",
            {"model": "fake-model", "input": "Hi"},
        )
        assert response.code == 200, body
        host = upstream.requests[-1].headers.getRawHeaders(b"host")
        assert host == [b"localhost:%d" % upstream_port]
        code = await terminate(process, reactor)
    finally:
        await kill_if_running(process, reactor)
    assert code in (0, "signal 15"), process.output.decode()
    assert b"Traceback" not in process.output, process.output.decode()


@pytest.mark.parametrize("mdwe", ["seccomp", "prctl"])
@pytest_twisted.ensureDeferred
async def test_memory_deny_write_execute_breaks_every_https_upstream(
    reactor: Any, sandbox: None, tmp_path: Path, client: Any, pki: dict[str, Any],
    tls_upstream: tuple[FakeUpstream, int], mdwe: str,
) -> None:
    """Why the unit leaves MemoryDenyWriteExecute= off: with it, setting up
    TLS fails (pyOpenSSL's cffi callbacks need write+execute memory), and
    each https request is a prompt 502 ``upstream_tls_error`` saying so.
    Both ways systemd enforces it (seccomp; PR_SET_MDWE from systemd 254)."""
    _, upstream_port = tls_upstream
    port = free_port()
    process = await start_sandboxed(
        reactor, tmp_path, unit_text(extra="MemoryDenyWriteExecute=yes"),
        https_config(port, upstream_port, pki["ca_file"]), port, mdwe,
    )
    try:
        response, body = await fetch(
            client, reactor, f"http://127.0.0.1:{port}/v1/chat/completions", CHAT,
        )
        code = await terminate(process, reactor)
    finally:
        await kill_if_running(process, reactor)
    assert response.code == 502, body
    error = json.loads(body)["error"]
    assert error["code"] == "upstream_tls_error"
    assert error["message"].startswith(f"TLS setup for 127.0.0.1:{upstream_port} failed")
    assert "write+execute memory" in error["message"]
    assert code in (0, "signal 15"), process.output.decode()


@pytest_twisted.ensureDeferred
async def test_workers_under_the_unit_sandbox(
    reactor: Any, sandbox: None, tmp_path: Path, pki: dict[str, Any],
    tls_upstream: tuple[FakeUpstream, int],
) -> None:
    """``workers: 2`` under the unit's seccomp rules: the first process
    starts the second (fork, exec, the shared socket), both answer from the
    https upstream, and SIGTERM stops both."""
    _, upstream_port = tls_upstream
    port = free_port()
    config = https_config(port, upstream_port, pki["ca_file"]) + "workers: 2\n"
    process = await start_sandboxed(reactor, tmp_path, unit_text(), config, port)
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    try:
        await process.wait_for(b"worker 2 serving").addTimeout(WAIT, reactor)
        logs = [tmp_path / "logs/llmproxy.log", tmp_path / "logs/llmproxy-worker2.log"]
        async def one() -> int:
            response, body = await fetch(
                agent, reactor, f"http://127.0.0.1:{port}/v1/chat/completions", CHAT,
            )
            return response.code

        for _ in range(5):
            codes = await gatherResults(
                [Deferred.fromCoroutine(one()) for _ in range(20)]
            ).addTimeout(WAIT, reactor)
            assert set(codes) == {200}
            served = [
                path.read_text().count('"log_namespace": "llmproxy.access"')
                if path.exists() else 0 for path in logs
            ]
            if all(served):
                break
        assert all(served), f"both workers served: {served}"
        code = await terminate(process, reactor)
    finally:
        await kill_if_running(process, reactor)
    assert code in (0, "signal 15"), process.output.decode()
    assert b"worker 2 ended" in process.output
    assert b"Traceback" not in process.output, process.output.decode()
