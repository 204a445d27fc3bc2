"""The documentation: a short README, links and paths that resolve, the
README's test command as CI runs it, and every config key documented.

These read README.md and docs/*.md as a reader would meet them: what they
check is what someone following the docs would trip over.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from llmproxy.config import ConfigError, parse_config_text

#: The repository root.
ROOT = Path(__file__).resolve().parent.parent

#: The most lines the README may have: a front door, not the manual.
MAX_README_LINES = 250

#: Top-level entries of the repository: a backticked path starting with one
#: of them names a file or folder of the repository.
_REPO_DIRS = (".ci/", "docs/", "etc/", "llmproxy/", "tests/", "twisted/")

#: Endings that make a backticked word a file name, wherever it points.
_FILE_ENDINGS = (".py", ".md", ".yml", ".yaml", ".cfg", ".toml", ".service", ".socket", ".tac")

_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_KNOWN_KEYS = re.compile(r"\(known keys: ([^)]*)\)")


def _documents() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _without_fences(text: str) -> str:
    """Markdown text with fenced code blocks removed."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: ``## Several instances`` -> ``several-instances``."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings."""
    text = _without_fences(path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def _repository_paths(text: str) -> list[str]:
    """Backticked words that name a file or folder of the repository.

    A word counts when it holds no space and either starts with one of the
    repository's top-level folders (``etc/config.yml``, ``llmproxy/``) or
    is a relative file name with a known ending (``README.md``,
    ``web.py``). Absolute paths (``/etc/llmproxy/config.yml``) are the
    target machine's, not the repository's.
    """
    found = []
    for match in _INLINE_CODE.finditer(_without_fences(text)):
        word = match.group(1).strip()
        if not word or " " in word or word.startswith(("/", "$", "~")):
            continue
        if word.startswith(_REPO_DIRS) or (word.endswith(_FILE_ENDINGS) and ":" not in word):
            found.append(word)
    return found


def test_readme_is_short() -> None:
    """The README is a front door of at most 250 lines."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; move detail to docs/ (at most {MAX_README_LINES})"
    )


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_backticked_paths_exist(doc: Path) -> None:
    """Every repository path a document names in backticks exists.

    Args:
        doc: The Markdown file.
    """
    missing = [
        word for word in _repository_paths(doc.read_text(encoding="utf-8"))
        if not (ROOT / word.rstrip("/")).exists()
    ]
    assert missing == [], f"{doc.name} names files the repository does not have: {missing}"


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    """Every relative link of a document reaches a file, and its heading.

    Args:
        doc: The Markdown file.
    """
    broken = []
    for match in _LINK.finditer(_without_fences(doc.read_text(encoding="utf-8"))):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # https:, mailto: ...
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert broken == [], f"{doc.name} has broken links: {broken}"


def _logical_lines(text: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _steps(command: str) -> list[list[str]]:
    """A ``&&`` chain as its commands, without options and redirections.

    ``apt-get install -y -qq x >/dev/null`` and ``apt-get install -y x``
    both become ``["apt-get", "install", "x"]``: the same step in substance.
    """
    steps = []
    for part in command.split("&&"):
        words = [
            w for w in shlex.split(part)
            if not w.startswith("-") and not w.startswith((">", "2>")) and w != "/dev/null"
        ]
        if words:
            steps.append(words)
    return steps


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's test command is the one ``.ci/run`` runs, flags aside.

    The same apt packages are installed, the same venv is made, the package
    is installed with its test extras and pytest runs, in the same order.
    """
    readme = [
        line.strip() for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("    ") and "python -m pytest" in line
    ]
    assert len(readme) == 1, f"expected one test command in README.md, found {readme}"
    ci = [
        line.strip() for line in _logical_lines((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
        if "python -m pytest" in line and not line.lstrip().startswith("#")
    ]
    assert len(ci) == 1, f"expected one pytest command in .ci/run, found {ci}"
    readme_steps, ci_steps = _steps(readme[0]), _steps(ci[0])
    assert _apt_packages(readme_steps) == _apt_packages(ci_steps)
    assert readme_steps == ci_steps
    assert readme_steps[-1][-1] == "pytest"


def _apt_packages(steps: list[list[str]]) -> list[str]:
    """The packages of the ``apt-get install`` steps."""
    return sorted(w for step in steps if step[:2] == ["apt-get", "install"] for w in step[2:])


_CALL = re.compile(r"`(llmproxy(?:\.\w+)+)\(")
_RUN_MODULE = re.compile(r"python3? -m (llmproxy(?:\.\w+)*)")


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cited_python_names_exist(doc: Path) -> None:
    """The functions a document tells you to call and the modules it tells
    you to run (``python -m llmproxy.bench``) exist.

    Args:
        doc: The Markdown file.
    """
    text = doc.read_text(encoding="utf-8")
    missing = []
    for name in sorted(set(_RUN_MODULE.findall(text))):
        if importlib.util.find_spec(name) is None:
            missing.append(name)
    for name in sorted(set(_CALL.findall(text))):
        module, _, attribute = name.rpartition(".")
        if not hasattr(importlib.import_module(module), attribute):
            missing.append(name)
    assert missing == [], f"{doc.name} cites Python names that do not exist: {missing}"


def _known_keys(yaml_text: str) -> list[str]:
    """The keys the config accepts at one place, from its unknown-key error.

    Args:
        yaml_text: A config with one unknown key, ``zz_unknown``, at the
            place asked about.

    Returns:
        The known keys the error message lists.
    """
    with pytest.raises(ConfigError) as caught:
        parse_config_text(yaml_text, environ={})
    unknown = [e for e in caught.value.errors if "zz_unknown" in e.key]
    found = _KNOWN_KEYS.search(unknown[0].message) if unknown else None
    assert found, f"no list of known keys in: {caught.value}"
    return [key.strip() for key in found.group(1).split(",")]


_TARGET = 'target_map: {"/": "http://upstream.example"}\n'

#: Where the config takes a mapping: a config with an unknown key
#: (``zz_unknown``) there, the prefix its keys carry in the docs, and the
#: section (``##`` heading) of docs/configuration.md whose tables list them.
_PLACES: dict[str, tuple[str, str, str]] = {
    "top level": (_TARGET + "zz_unknown: 1\n", "", "Keys"),
    "timeouts": (_TARGET + "timeouts: {zz_unknown: 1}\n", "timeouts.", "Keys"),
    "pool": (_TARGET + "pool: {zz_unknown: 1}\n", "pool.", "Keys"),
    "tls": (_TARGET + "tls: {zz_unknown: 1}\n", "tls.", "Keys"),
    "log": (_TARGET + "log: {zz_unknown: 1}\n", "log.", "Keys"),
    "rate_limit": (_TARGET + "rate_limit: {zz_unknown: 1}\n", "rate_limit.", "Keys"),
    "auth": (_TARGET + "auth: {zz_unknown: 1}\n", "auth.", "Keys"),
    "metrics": (_TARGET + "metrics: {zz_unknown: 1}\n", "metrics.", "Keys"),
    "route": ('target_map: {"/": {urls: ["http://u.example"], zz_unknown: 1}}\n', "", "Routes"),
    "URL entry": (
        'target_map: {"/": {urls: [{url: "http://u.example", zz_unknown: 1}]}}\n', "", "Routes"
    ),
    "client key": (_TARGET + "auth: {keys: [{key: k, zz_unknown: 1}]}\n", "", "Client keys"),
    "budget": (
        _TARGET + "auth: {keys: [{key: k, name: n, budget: {tokens: 1, per: day, "
        "zz_unknown: 1}}]}\n",
        "budget.",
        "Client keys",
    ),
}


def _documented_keys() -> dict[str, set[str]]:
    """The keys docs/configuration.md documents, by section.

    A key table is a Markdown table whose header's first cell is ``key``;
    each row names one or more keys in backticks in its first cell
    (``auth.keys``, ``rate_limit.store``).

    Returns:
        Section title (its ``##`` heading) -> the keys its key tables name.
    """
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    tables: dict[str, set[str]] = {}
    section, in_table = "", False
    for line in text.splitlines():
        heading = re.match(r"(#{2,3})\s+(.+)", line)
        if heading:
            if heading.group(1) == "##":
                section = heading.group(2).strip()
            in_table = False
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        first = line.strip().strip("|").split("|")[0].strip()
        if first == "key":
            in_table = True
        elif in_table and not set(first) <= set("-: "):
            tables.setdefault(section, set()).update(_INLINE_CODE.findall(first))
    return tables


@pytest.mark.parametrize("place", list(_PLACES))
def test_every_accepted_key_is_documented(place: str) -> None:
    """Every key the config accepts has a row in docs/configuration.md.

    The accepted keys are those the config's own unknown-key error lists,
    so a key added to the code without documentation fails here. A section
    (``rate_limit``, ``log``...) is documented by the rows of its keys.

    Args:
        place: Where in the config (the top level, a section, a route...).
    """
    yaml_text, prefix, section = _PLACES[place]
    documented = _documented_keys().get(section, set())
    missing = [
        prefix + key for key in _known_keys(yaml_text)
        if prefix + key not in documented
        and not any(name.startswith(prefix + key + ".") for name in documented)
    ]
    assert missing == [], f"{place}: keys accepted but not documented: {missing}"


def test_every_documented_key_is_accepted() -> None:
    """Every key docs/configuration.md documents is one the config accepts."""
    accepted: dict[str, set[str]] = {}
    for yaml_text, prefix, section in _PLACES.values():
        accepted.setdefault(section, set()).update(prefix + key for key in _known_keys(yaml_text))
    unknown = [
        f"{section}: {name}"
        for section, names in sorted(_documented_keys().items())
        for name in sorted(names)
        if name not in accepted.get(section, set())
    ]
    assert unknown == [], f"documented keys the config does not accept: {unknown}"
