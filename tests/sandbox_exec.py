"""Run a program under the seccomp sandbox of a systemd unit file.

Run by Debian's ``/usr/bin/python3``, which has ``python3-seccomp``::

    /usr/bin/python3 tests/sandbox_exec.py UNIT -- PROGRAM [ARG...]
    /usr/bin/python3 tests/sandbox_exec.py --mdwe=prctl UNIT -- PROGRAM [ARG...]
    /usr/bin/python3 tests/sandbox_exec.py --probe

It reads the ``[Service]`` section of UNIT, applies what systemd would apply
in the process it starts, as far as a process can do it to itself, then
``execv``s PROGRAM. Seccomp filters, no_new_privs, the capability bounding
set and the umask all survive ``execv``, so PROGRAM runs as it would under
systemd's executor.

The rules are those of systemd 252 (Debian 12), ``src/shared/seccomp-util.c``
and ``src/core/execute.c``, for the native architecture (which
``SystemCallArchitectures=native`` makes the only one allowed):

- ``MemoryDenyWriteExecute=yes``: ``mmap`` with PROT_WRITE|PROT_EXEC,
  ``mprotect``/``pkey_mprotect`` with PROT_EXEC and ``shmat`` with
  SHM_EXEC fail with EPERM. systemd 254 and later, on Linux 6.3 and later,
  use ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`` instead
  (``--mdwe=prctl``): no new mapping may be writable and executable.
- ``RestrictAddressFamilies=``: ``socket()`` with another family fails
  with EAFNOSUPPORT.
- ``RestrictNamespaces=yes``: ``setns`` fails, ``unshare``/``clone`` with a
  CLONE_NEW* flag fail with EPERM, ``clone3`` with ENOSYS (its flags are out
  of seccomp's reach; glibc then falls back to ``clone``).
- ``LockPersonality=yes``: ``personality()`` to anything but PER_LINUX
  fails with EPERM.
- ``RestrictRealtime=yes``: ``sched_setscheduler`` to a realtime policy
  fails with EPERM.
- ``RestrictSUIDSGID=yes``: creating or chmod-ing a file set-user-ID or
  set-group-ID fails with EPERM, as does ``openat2``.
- ``SystemCallFilter=``: an allow list (``@default`` always included) or a
  deny list (``~``); groups are expanded by the installed systemd
  (``systemd-analyze syscall-filter``). Other calls kill the process
  (SIGSYS), or fail with ``SystemCallErrorNumber=``.
- ``SystemCallArchitectures=native``: a call of another ABI kills.
- The seccomp halves of ``PrivateDevices=`` (``~@raw-io``),
  ``ProtectKernelModules=`` (``~@module``), ``ProtectKernelTunables=``
  (``_sysctl``), ``ProtectKernelLogs=`` (``syslog``), ``ProtectClock=``
  (``~@clock``) and ``ProtectHostname=`` (``sethostname``,
  ``setdomainname``): EPERM.
- ``NoNewPrivileges=yes``, an empty ``CapabilityBoundingSet=`` (dropped when
  this process may, i.e. as root; an unprivileged process has no
  capability to lose) and ``UMask=``.

What needs systemd itself (mount namespaces, the dynamic user, directories)
is not applied: see :data:`NOT_APPLIED`.

Exit status 77 with ``--probe`` (or before running PROGRAM): seccomp is out
of reach here (no ``seccomp`` module, or no seccomp filters in the kernel),
with the reason on stdout. Status 2: a unit setting this launcher cannot
apply faithfully.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

#: Exit status when seccomp is not available here.
UNAVAILABLE = 77

#: Sandbox settings applied whole.
APPLIED = frozenset({
    "NoNewPrivileges", "MemoryDenyWriteExecute", "SystemCallArchitectures",
    "LockPersonality", "RestrictNamespaces", "RestrictAddressFamilies",
    "RestrictRealtime", "RestrictSUIDSGID", "SystemCallFilter",
    "SystemCallErrorNumber", "CapabilityBoundingSet", "UMask",
})

#: Sandbox settings of which the seccomp half is applied (the rest is mounts).
SECCOMP_HALF = {
    "PrivateDevices": ("@raw-io",),
    "ProtectKernelModules": ("@module",),
    "ProtectKernelTunables": ("_sysctl",),
    "ProtectKernelLogs": ("syslog",),
    "ProtectClock": ("@clock",),
    "ProtectHostname": ("sethostname", "setdomainname"),
}

#: Sandbox settings that need systemd (mount namespaces, users): not applied.
NOT_APPLIED = frozenset({
    "DynamicUser", "ProtectSystem", "ProtectHome", "PrivateTmp",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "LogsDirectory",
    "ConfigurationDirectory", "StateDirectory", "RuntimeDirectory",
    "CacheDirectory", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
    "PrivateUsers", "PrivateNetwork", "PrivateIPC", "User", "Group",
})

#: [Service] settings that are not sandboxing at all.
NOT_SANDBOX = frozenset({
    "Type", "ExecStart", "ExecReload", "KillSignal", "TimeoutStopSec",
    "Restart", "RestartSec", "Sockets", "Environment", "WorkingDirectory",
    "LimitNOFILE",
})

_TRUE = {"1", "yes", "y", "true", "t", "on"}
_FALSE = {"0", "no", "n", "false", "f", "off"}

# Linux constants (uapi headers); the same on every architecture systemd
# filters mmap() on here.
_SHM_EXEC = 0o100000
_S_ISUID, _S_ISGID = 0o4000, 0o2000
_CLONE_NEW = {
    "cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000, "mnt": 0x00020000,
    "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000,
}
_SCHED_OTHER, _SCHED_BATCH, _SCHED_IDLE = 0, 3, 5
_PER_LINUX = 0
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP, _PR_SET_SECCOMP, _PR_GET_SECCOMP = 38, 24, 22, 21
_PR_SET_MDWE, _PR_GET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
_SECCOMP_MODE_FILTER = 2


class UnitError(Exception):
    """A unit setting this launcher cannot apply faithfully."""


def service_settings(text: str) -> dict[str, list[str]]:
    """The assignments of a unit file's ``[Service]`` section.

    Args:
        text: The unit file.

    Returns:
        Each key with its values in file order (an empty value is a reset,
        as systemd reads it).
    """
    settings: dict[str, list[str]] = {}
    section = None
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unknown_keys(settings: dict[str, list[str]]) -> list[str]:
    """The ``[Service]`` keys this launcher neither applies nor classifies."""
    known = APPLIED | SECCOMP_HALF.keys() | NOT_APPLIED | NOT_SANDBOX
    return sorted(set(settings) - known)


def _flag(settings: dict[str, list[str]], key: str) -> bool:
    """A boolean setting: the last assignment wins."""
    values = settings.get(key) or ["no"]
    value = values[-1].lower()
    if value not in _TRUE | _FALSE:
        raise UnitError(f"{key}={values[-1]}: not a boolean")
    return value in _TRUE


def _list(settings: dict[str, list[str]], key: str) -> tuple[bool, list[str]] | None:
    """A list setting as systemd merges it: ``(deny_list, items)``, or None.

    The first non-empty assignment decides allow or deny (a leading
    ``~``); an empty assignment resets.
    """
    deny: bool | None = None
    items: list[str] = []
    for value in settings.get(key, []):
        if not value:
            deny, items = None, []
            continue
        invert = value.startswith("~")
        words = value.lstrip("~").split()
        if deny is None:
            deny = invert
            items = words
        elif invert == deny:
            items += words
        else:
            items = [w for w in items if w not in words]
    return None if deny is None else (deny, items)


#: Groups expanded so far, by name.
_GROUPS: dict[str, list[str]] = {}


def syscall_group(name: str) -> list[str]:
    """The system calls of a systemd group (``@system-service``), nested
    groups expanded, as the installed systemd defines them.

    Args:
        name: A group (``@...``) or a single system call.

    Returns:
        System call names.
    """
    if not name.startswith("@"):
        return [name]
    if name not in _GROUPS:
        out = subprocess.run(
            ["systemd-analyze", "syscall-filter", "--no-pager", name],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.splitlines()
        if not out or out[0].strip() != name:
            raise UnitError(f"systemd-analyze does not know the group {name}")
        calls: list[str] = []
        for line in out[1:]:
            word = line.strip()
            if word and not word.startswith("#"):
                calls += syscall_group(word)
        _GROUPS[name] = calls
    return _GROUPS[name]


def _resolvable(seccomp: Any, names: Iterable[str]) -> list[str]:
    """The names libseccomp knows on this architecture (systemd skips the rest)."""
    found = []
    for name in dict.fromkeys(names):
        try:
            if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) >= 0:
                found.append(name)
        except ValueError:
            pass
    return found


def _prctl(*args: int) -> int:
    """``prctl(2)``; raises OSError on failure."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    result = libc.prctl(*args, *([0] * (5 - len(args))))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def probe() -> str | None:
    """Why seccomp filters cannot be applied here, or None when they can."""
    try:
        import seccomp  # noqa: F401
    except ImportError:
        return "the seccomp module is missing: apt-get install python3-seccomp"
    try:
        _prctl(_PR_GET_SECCOMP)
    except OSError as e:
        return f"the kernel has no seccomp (PR_GET_SECCOMP: {e.strerror})"
    try:
        _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, 0)
    except OSError as e:
        if e.errno != errno.EFAULT:
            return f"the kernel has no seccomp filters (PR_SET_SECCOMP: {e.strerror})"
    return None


def _filters(settings: dict[str, list[str]], seccomp: Any, mdwe: str) -> list[Any]:
    """The seccomp filters of a unit, in the order systemd loads them."""
    eperm = seccomp.ERRNO(errno.EPERM)

    def allow_all() -> Any:
        # seccomp_init_for_arch(): allow by default, leave other ABIs to
        # the architecture filter, leave no_new_privs to us.
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.ALLOW)
        f.set_attr(seccomp.Attr.CTL_NNP, 0)
        return f

    def deny(action: Any, names: Iterable[str]) -> Any:
        f = allow_all()
        for name in _resolvable(seccomp, names):
            f.add_rule_exactly(action, name)
        return f

    def arg(index: int, op: Any, *values: int) -> Any:
        return seccomp.Arg(index, op, *values)

    masked = seccomp.MASKED_EQ
    filters: list[Any] = []

    families = _list(settings, "RestrictAddressFamilies")
    if families:
        deny_list, names = families
        numbers = sorted({_address_family(name) for name in names})
        f = allow_all()
        refuse = seccomp.ERRNO(errno.EAFNOSUPPORT)
        if deny_list:
            for af in numbers:
                f.add_rule_exactly(refuse, "socket", arg(0, seccomp.EQ, af))
        else:
            f.add_rule_exactly(refuse, "socket", arg(0, seccomp.LT, numbers[0]))
            f.add_rule_exactly(refuse, "socket", arg(0, seccomp.GT, numbers[-1]))
            for af in range(numbers[0] + 1, numbers[-1]):
                if af not in numbers:
                    f.add_rule_exactly(refuse, "socket", arg(0, seccomp.EQ, af))
        filters.append(f)

    if _flag(settings, "MemoryDenyWriteExecute") and mdwe == "seccomp":
        write_exec = mmap.PROT_WRITE | mmap.PROT_EXEC
        f = allow_all()
        f.add_rule_exactly(eperm, "mmap", arg(2, masked, write_exec, write_exec))
        for name in _resolvable(seccomp, ["mprotect", "pkey_mprotect"]):
            f.add_rule_exactly(eperm, name, arg(2, masked, mmap.PROT_EXEC, mmap.PROT_EXEC))
        f.add_rule_exactly(eperm, "shmat", arg(2, masked, _SHM_EXEC, _SHM_EXEC))
        filters.append(f)

    if _flag(settings, "RestrictRealtime"):
        f = allow_all()
        allowed = (_SCHED_OTHER, _SCHED_BATCH, _SCHED_IDLE)
        for policy in range(max(allowed)):
            if policy not in allowed:
                f.add_rule_exactly(eperm, "sched_setscheduler", arg(1, seccomp.EQ, policy))
        f.add_rule_exactly(eperm, "sched_setscheduler", arg(1, seccomp.GT, max(allowed)))
        filters.append(f)

    if _flag(settings, "RestrictSUIDSGID"):
        f = allow_all()
        for bit in (_S_ISUID, _S_ISGID):
            for name, index in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("mkdir", 1),
                                ("mkdirat", 2), ("mknod", 1), ("mknodat", 2), ("creat", 1)):
                f.add_rule_exactly(eperm, name, arg(index, masked, bit, bit))
            f.add_rule_exactly(eperm, "open", arg(1, masked, os.O_CREAT, os.O_CREAT),
                               arg(2, masked, bit, bit))
            f.add_rule_exactly(eperm, "openat", arg(2, masked, os.O_CREAT, os.O_CREAT),
                               arg(3, masked, bit, bit))
        f.add_rule_exactly(eperm, "openat2")
        filters.append(f)

    namespaces = settings.get("RestrictNamespaces")
    if namespaces and namespaces[-1].lower() not in _FALSE:
        if namespaces[-1].lower() not in _TRUE:
            raise UnitError("only RestrictNamespaces=yes/no is applied here")
        f = allow_all()
        f.add_rule_exactly(eperm, "setns")
        for flag in _CLONE_NEW.values():
            f.add_rule_exactly(eperm, "unshare", arg(0, masked, flag, flag))
            f.add_rule_exactly(eperm, "clone", arg(0, masked, flag, flag))
        f.add_rule_exactly(seccomp.ERRNO(errno.ENOSYS), "clone3")
        filters.append(f)

    for key, names in SECCOMP_HALF.items():
        if _flag(settings, key):
            filters.append(deny(eperm, (c for n in names for c in syscall_group(n))))

    archs = _list(settings, "SystemCallArchitectures")
    if archs:
        if archs != (False, ["native"]):
            raise UnitError("only SystemCallArchitectures=native is applied here")
        f = seccomp.SyscallFilter(seccomp.ALLOW)  # other ABIs: libseccomp's KILL
        f.set_attr(seccomp.Attr.CTL_NNP, 0)
        filters.append(f)

    if _flag(settings, "LockPersonality"):
        f = allow_all()
        f.add_rule_exactly(eperm, "personality", arg(0, seccomp.NE, _PER_LINUX))
        filters.append(f)

    calls = _list(settings, "SystemCallFilter")
    if calls:
        deny_list, names = calls
        if any(":" in name for name in names):
            raise UnitError("SystemCallFilter= with per-call errnos is not applied here")
        number = (settings.get("SystemCallErrorNumber") or ["kill"])[-1]
        refuse = (seccomp.KILL_PROCESS if number in ("kill", "")
                  else seccomp.ERRNO(getattr(errno, number)))
        expanded = [c for n in names for c in syscall_group(n)]
        if deny_list:
            filters.append(deny(refuse, expanded))
        else:
            # The last filter loaded (closest to execve), as in systemd.
            f = seccomp.SyscallFilter(refuse)
            f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.ALLOW)
            f.set_attr(seccomp.Attr.CTL_NNP, 0)
            for name in _resolvable(seccomp, syscall_group("@default") + expanded):
                f.add_rule_exactly(seccomp.ALLOW, name)
            filters.append(f)
    return filters


def _address_family(name: str) -> int:
    """The number of ``AF_INET`` and friends."""
    import socket

    try:
        return int(getattr(socket, name))
    except AttributeError:
        raise UnitError(f"RestrictAddressFamilies: unknown family {name}") from None


def _drop_capabilities(settings: dict[str, list[str]]) -> None:
    """An empty ``CapabilityBoundingSet=``: drop every capability we may."""
    values = settings.get("CapabilityBoundingSet")
    if values is None:
        return
    if values[-1]:
        raise UnitError("only an empty CapabilityBoundingSet= is applied here")
    if os.geteuid() != 0:
        return  # no capability to lose, and no CAP_SETPCAP to drop them with
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _prctl(_PR_CAPBSET_DROP, cap)


def apply(settings: dict[str, list[str]], mdwe: str = "seccomp") -> None:
    """Apply a unit's sandbox to this process (and what it execs).

    Args:
        settings: From :func:`service_settings`.
        mdwe: How ``MemoryDenyWriteExecute=yes`` is enforced: ``seccomp``
            (systemd before 254) or ``prctl`` (PR_SET_MDWE, systemd 254+).

    Raises:
        UnitError: A setting this launcher cannot apply faithfully.
        OSError: The kernel refused.
    """
    import seccomp

    filters = _filters(settings, seccomp, mdwe)
    umask = settings.get("UMask")
    if umask:
        os.umask(int(umask[-1], 8))
    _drop_capabilities(settings)
    if _flag(settings, "NoNewPrivileges") or os.geteuid() != 0:
        # systemd implies it for seccomp settings without CAP_SYS_ADMIN.
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if _flag(settings, "MemoryDenyWriteExecute") and mdwe == "prctl":
        _prctl(_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN)
    for f in filters:
        f.load()


def main(argv: list[str], execv: Callable[[str, list[str]], Any] = os.execv) -> int:
    """Parse the command line, apply the sandbox and exec the program."""
    reason = probe()
    if argv[:1] == ["--probe"]:
        print(reason or "ok")
        return UNAVAILABLE if reason else 0
    mdwe = "seccomp"
    if argv and argv[0].startswith("--mdwe="):
        mdwe = argv.pop(0).split("=", 1)[1]
    if len(argv) < 3 or argv[1] != "--" or mdwe not in ("seccomp", "prctl"):
        print("\n\n".join(__doc__.split("\n\n")[1:3]), file=sys.stderr)
        return 2
    if reason:
        print(reason)
        return UNAVAILABLE
    with open(argv[0]) as f:
        settings = service_settings(f.read())
    try:
        unknown = unknown_keys(settings)
        if unknown:
            raise UnitError(f"settings not known to {__file__}: {', '.join(unknown)}")
        if mdwe == "prctl":
            try:
                _prctl(_PR_GET_MDWE)
            except OSError:
                print("this kernel has no PR_SET_MDWE (Linux 6.3+)")
                return UNAVAILABLE
        apply(settings, mdwe)
    except UnitError as e:
        print(f"sandbox_exec: {argv[0]}: {e}", file=sys.stderr)
        return 2
    program = argv[2:]
    execv(program[0], program)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
