"""Guard: importing llmproxy has no side effects.

Every module of the package is imported in a fresh interpreter, so that
nothing this test process has already imported hides a side effect. After
that no reactor may be installed (STYLE.md: the reactor is passed in, never
imported at module level) and nothing may have been written to the working
directory (no ``logs/`` folder made at import time).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

#: The repository root: the directory holding the llmproxy package.
ROOT = Path(__file__).resolve().parent.parent

#: Run in the fresh interpreter; prints one JSON line as its last line.
SCRIPT = """
import importlib
import ast
import json
import pkgutil
import sys

import llmproxy

modules, failed = [], {}


def onerror(name):
    failed[name] = repr(sys.exc_info()[1])


for info in pkgutil.walk_packages(llmproxy.__path__, "llmproxy.", onerror=onerror):
    if info.name.rsplit(".", 1)[-1] == "__main__":
        continue
    modules.append(info.name)
    try:
        importlib.import_module(info.name)
    except Exception as e:
        failed[info.name] = repr(e)

print(json.dumps({
    "package": llmproxy.__file__,
    "modules": modules,
    "failed": failed,
    "reactor": "twisted.internet.reactor" in sys.modules,
}))
"""


def test_importing_every_module_has_no_side_effects(tmp_path: Path) -> None:
    """All llmproxy modules import without installing a reactor or writing files."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).resolve().parent == ROOT / "llmproxy"
    assert "llmproxy.metrics" in result["modules"]
    assert result["failed"] == {}, "modules that failed to import:\n" + "\n".join(
        f"{name}: {error}" for name, error in result["failed"].items()
    )
    assert not result["reactor"], "importing llmproxy installed the global reactor"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "files made at import time"


#: Packages whose private modules and names nothing outside them imports.
GUARDED = ("llmproxy.config", "llmproxy.limits")

#: Files that still import limits' private modules, left to the rewrite of
#: llmproxy/proxy/ (every name they import is exported by llmproxy.limits).
NOT_YET = frozenset({"llmproxy/proxy/_exchange.py", "llmproxy/proxy/_resource.py"})


def imported_names(path: Path) -> list[tuple[int, str]]:
    """Every llmproxy name a file imports, at any depth (functions included).

    Args:
        path: A Python file.

    Returns:
        ``(line, dotted name)`` for each: ``llmproxy.limits._store.Limits``
        for ``from llmproxy.limits._store import Limits``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "llmproxy"]


def test_config_imports_no_other_llmproxy_package() -> None:
    """The config is the ground floor: it imports nothing else of llmproxy."""
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in sorted((ROOT / "llmproxy" / "config").rglob("*.py"))
        for line, name in imported_names(path)
        if not name.startswith("llmproxy.config.")
    ]
    assert not wrong, "config imports other llmproxy packages:\n" + "\n".join(wrong)


def test_private_parts_of_config_and_limits_stay_inside() -> None:
    """Nothing outside config and limits imports their ``_module`` or ``_name``."""
    wrong = []
    for path in sorted([*(ROOT / "llmproxy").rglob("*.py"), *(ROOT / "tests").glob("*.py")]):
        where = path.relative_to(ROOT).as_posix()
        for line, name in imported_names(path):
            for package in GUARDED:
                inside = where.startswith(package.replace(".", "/") + "/")
                rest = name.removeprefix(package + ".")
                if rest != name and not inside and rest.startswith("_") and where not in NOT_YET:
                    wrong.append(f"{where}:{line}: {name}")
    assert not wrong, "private names imported:\n" + "\n".join(wrong)


def test_importing_limits_leaves_txredisapi_alone() -> None:
    """txredisapi installs the reactor: only making a RedisStore imports it."""
    script = (
        "import sys\n"
        "from llmproxy.limits import RedisStore\n"
        "assert 'txredisapi' not in sys.modules, 'imported txredisapi'\n"
        "assert 'twisted.internet.reactor' not in sys.modules, 'installed a reactor'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
