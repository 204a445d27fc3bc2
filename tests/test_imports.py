"""Guard: importing llmproxy has no side effects.

Every module of the package is imported in a fresh interpreter, so that
nothing this test process has already imported hides a side effect. After
that no reactor may be installed (STYLE.md: the reactor is passed in, never
imported at module level) and nothing may have been written to the working
directory (no ``logs/`` folder made at import time).
"""

from __future__ import annotations

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
