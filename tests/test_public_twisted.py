"""Guard: llmproxy uses only Twisted's public names (STYLE.md, design rules).

Every ``.py`` file under ``llmproxy/`` is read with :mod:`ast` and checked
for the ways code reaches into Twisted's privates:

- an import from a Twisted module whose path has a ``_`` component
  (``from twisted.web._newclient import X``, ``import twisted.internet._x``,
  or the same path given to ``importlib.import_module``/``__import__``);
- a ``_``-prefixed name imported from any Twisted module
  (``from twisted.web.client import _Foo``);
- ``x._name`` (not a dunder) where ``x`` is not ``self``/``cls``, nor a name
  bound by an ``llmproxy`` import in that file, nor a parameter or variable
  annotated with llmproxy's own types only (``other: RootResource``, a class
  of the same file or one imported from llmproxy): a ``._name`` of any other
  object may be someone else's private, Twisted's included
  (``response._transport``);
- ``getattr``/``setattr``/``hasattr``/``delattr`` with a literal private
  name, under the same rule;
- in a class with a Twisted base class (or declaring a Twisted interface
  with ``@implementer``), a ``def _name`` or a ``self._name`` where that
  base or interface has ``_name``: overriding or reading Twisted's private
  hooks through ``self``.

The exceptions are listed in :data:`ALLOWED_IMPORTS` and
:data:`ALLOWED_OVERRIDES`, and the test fails when anything else is found,
naming ``file:line`` for each.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

#: The llmproxy package's source tree.
PACKAGE = Path(__file__).resolve().parent.parent / "llmproxy"

#: (module, name) imports allowed despite a private module path.
#: The one exception (STYLE.md): Twisted has no public name for "a trust
#: root" such as the system store plus a CA file, so the interface is
#: imported from its private module, in one place only.
ALLOWED_IMPORTS = frozenset({("twisted.internet._sslverify", "IOpenSSLTrustRoot")})

#: (Twisted base or interface, method name) a class may define although the
#: name is private: implementing IOpenSSLTrustRoot (the exception above)
#: means defining its one method, ``_addCACertsToContext``. Only the
#: definition is allowed; reading the attribute on another object is not.
ALLOWED_OVERRIDES = frozenset(
    {("twisted.internet._sslverify.IOpenSSLTrustRoot", "_addCACertsToContext")}
)

#: Calls that take an attribute name as their second argument.
_ATTRIBUTE_CALLS = frozenset({"getattr", "setattr", "hasattr", "delattr"})

#: Calls that take a module path as their first argument.
_IMPORT_CALLS = frozenset({"import_module", "__import__"})


def _is_private(name: str) -> bool:
    """Whether ``name`` is private: ``_``-prefixed and not a dunder."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_twisted(module: str) -> bool:
    """Whether a dotted module path is inside the ``twisted`` package."""
    return module == "twisted" or module.startswith("twisted.")


def _private_path(module: str) -> bool:
    """Whether a dotted path has a ``_``-prefixed component."""
    return any(part.startswith("_") for part in module.split("."))


def _is_own(module: str | None, level: int) -> bool:
    """Whether an import's module is llmproxy's own (or relative)."""
    if level > 0:
        return True
    return module is not None and (module == "llmproxy" or module.startswith("llmproxy."))


def _resolve_object(path: str) -> Any:
    """Import the object a dotted Twisted path names, or ``None``."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _names_of(obj: Any) -> frozenset[str]:
    """The attribute names a Twisted base class or interface declares."""
    names = getattr(obj, "names", None)
    if callable(names) and hasattr(obj, "providedBy"):  # a zope Interface
        try:
            return frozenset(names(all=True))
        except TypeError:
            return frozenset()
    if isinstance(obj, type):
        return frozenset(dir(obj))
    return frozenset()


class _Scanner(ast.NodeVisitor):
    """Collects private-Twisted-name uses in one module's syntax tree."""

    def __init__(self, path: str, tree: ast.AST) -> None:
        self.path = path
        self.violations: list[str] = []
        #: Allowed exceptions that were used, as "path:line: what".
        self.allowed: list[str] = []
        #: Local names bound by ``import llmproxy...``/``from llmproxy... import``.
        self.own: set[str] = set()
        #: Local names bound by Twisted imports -> the dotted path they name.
        self.twisted: dict[str, str] = {}
        #: Per enclosing class: its Twisted bases/interfaces' (path, names).
        self.classes: list[list[tuple[str, frozenset[str]]]] = []
        #: Per enclosing function: its local names -> the own types their
        #: annotation names (empty: not only llmproxy's own types).
        self.scopes: list[dict[str, frozenset[str]]] = []
        #: Classes this file defines (own types, like llmproxy imports).
        self.own_types: set[str] = {
            node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
        }
        #: Per class of this file (by name): its Twisted parents.
        self.parents: dict[str, list[tuple[str, frozenset[str]]]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    target = alias.name if alias.asname else bound
                    if _is_own(alias.name, 0):
                        self.own.add(bound)
                    elif _is_twisted(alias.name):
                        self.twisted[bound] = target
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    bound = alias.asname or alias.name
                    if _is_own(node.module, node.level):
                        self.own.add(bound)
                    elif node.level == 0 and node.module and _is_twisted(node.module):
                        self.twisted[bound] = f"{node.module}.{alias.name}"
        self.own_types |= self.own
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                self.parents[node.name] = self._twisted_parents(node)

    def report(self, node: ast.AST, message: str) -> None:
        """Record a violation at ``node``'s line."""
        self.violations.append(f"{self.path}:{getattr(node, 'lineno', 0)}: {message}")

    # Imports.

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _is_twisted(alias.name) and _private_path(alias.name):
                self.report(node, f"import of private Twisted module {alias.name}")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and _is_twisted(module):
            for alias in node.names:
                if (module, alias.name) in ALLOWED_IMPORTS:
                    self.allowed.append(
                        f"{self.path}:{node.lineno}: from {module} import {alias.name}"
                    )
                elif _private_path(module):
                    self.report(
                        node, f"import from private Twisted module {module}: {alias.name}"
                    )
                elif _is_private(alias.name):
                    self.report(node, f"private Twisted name imported: {module}.{alias.name}")
        self.generic_visit(node)

    # Classes built on Twisted's: their private hooks.

    def _twisted_path(self, expr: ast.expr) -> str | None:
        """The dotted Twisted path an expression names, if it names one."""
        if isinstance(expr, ast.Name):
            return self.twisted.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = self._twisted_path(expr.value)
            return None if base is None else f"{base}.{expr.attr}"
        return None

    def _twisted_parents(self, node: ast.ClassDef) -> list[tuple[str, frozenset[str]]]:
        """A class's Twisted bases and ``@implementer`` interfaces, with their names."""
        exprs = list(node.bases)
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call):
                func = decorator.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name == "implementer":
                    exprs.extend(decorator.args)
        parents = []
        for expr in exprs:
            path = self._twisted_path(expr)
            if path is not None:
                obj = _resolve_object(path)
                if obj is not None:
                    parents.append((path, _names_of(obj)))
        return parents

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        parents = self._twisted_parents(node)
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(
                item.name
            ):
                for path, names in parents:
                    if item.name not in names:
                        continue
                    if (path, item.name) in ALLOWED_OVERRIDES:
                        self.allowed.append(f"{self.path}:{item.lineno}: def {item.name}")
                    else:
                        self.report(
                            item, f"defines {item.name}, a private name of Twisted's {path}"
                        )
        self.classes.append(parents)
        self.generic_visit(node)
        self.classes.pop()

    # Functions: which local names hold llmproxy's own objects.

    def _own_annotation(self, annotation: ast.expr | None) -> frozenset[str]:
        """The own types an annotation names, if it names only those (and None).

        ``Own``, ``Own | None``, ``"Own"``, ``module.Own`` (an llmproxy
        module) count; anything else (a Twisted type, ``Any``, a generic)
        gives the empty set.
        """
        nothing: frozenset[str] = frozenset()
        if annotation is None:
            return nothing
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            try:
                annotation = ast.parse(annotation.value, mode="eval").body
            except SyntaxError:
                return nothing
        roots = set()
        for node in ast.walk(annotation):
            if isinstance(node, ast.Attribute):
                continue
            if isinstance(node, ast.Name):
                roots.add(node.id)
            elif isinstance(node, ast.Constant) and node.value is not None:
                return nothing
            elif not isinstance(node, (ast.BinOp, ast.BitOr, ast.Load, ast.Constant)):
                return nothing
        roots.discard("None")
        return frozenset(roots) if roots and roots <= self.own_types else nothing

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        arguments = node.args
        scope = {
            arg.arg: self._own_annotation(arg.annotation)
            for arg in (
                *arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                *filter(None, (arguments.vararg, arguments.kwarg)),
            )
        }
        self.scopes.append(scope)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function
    visit_Lambda = _visit_function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if self.scopes and isinstance(node.target, ast.Name):
            self.scopes[-1][node.target.id] = self._own_annotation(node.annotation)
        self.generic_visit(node)

    def _own_types_of(self, name: str) -> frozenset[str]:
        """The own types a local name is annotated with (empty if not own)."""
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return frozenset()

    # Attribute access.

    def _twisted_private(
        self, node: ast.AST, parents: list[tuple[str, frozenset[str]]], shown: str,
        name: str, how: str,
    ) -> None:
        """Report ``name`` if one of an own class's Twisted parents has it."""
        for path, names in parents:
            if name in names:
                self.report(node, f"{how} {shown}.{name}, a private name of Twisted's {path}")

    def _root_is_own(self, expr: ast.expr) -> bool:
        """Whether ``expr`` is a dotted name rooted at an llmproxy import."""
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return isinstance(expr, ast.Name) and expr.id in self.own

    def _check(self, node: ast.AST, obj: ast.expr, name: str, how: str) -> None:
        """Check an access to attribute ``name`` of ``obj``."""
        if not _is_private(name):
            return
        if isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
            parents = self.classes[-1] if self.classes else []
            self._twisted_private(node, parents, obj.id, name, how)
            return
        if isinstance(obj, ast.Name):
            # A name annotated with own types: our object, unless the name
            # is one its Twisted parents have.
            types = self._own_types_of(obj.id)
            if types:
                for own in types:
                    self._twisted_private(node, self.parents.get(own, []), obj.id, name, how)
                return
        if self._root_is_own(obj):
            return
        self.report(node, f"{how} {ast.unparse(obj)}.{name} (another object's private name)")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check(node, node.value, node.attr, "access to")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        args = node.args
        if (
            name in _ATTRIBUTE_CALLS
            and len(args) >= 2
            and isinstance(args[1], ast.Constant)
            and isinstance(args[1].value, str)
        ):
            self._check(node, args[0], args[1].value, f"{name}() of")
        if (
            name in _IMPORT_CALLS
            and args
            and isinstance(args[0], ast.Constant)
            and isinstance(args[0].value, str)
            and _is_twisted(args[0].value)
            and _private_path(args[0].value)
        ):
            self.report(node, f"{name}() of private Twisted module {args[0].value}")
        self.generic_visit(node)


def scan_source(source: str, path: str = "<snippet>") -> tuple[list[str], list[str]]:
    """Scan one module's source for private Twisted names.

    Args:
        source: The module's Python source.
        path: The name to report violations under.

    Returns:
        The violations and the allowed exceptions used, each as
        ``"path:line: what"``.
    """
    tree = ast.parse(source, filename=path)
    scanner = _Scanner(path, tree)
    scanner.visit(tree)
    return scanner.violations, scanner.allowed


def _sources() -> Iterator[Path]:
    """Every ``.py`` file of the package, in a stable order."""
    return iter(sorted(PACKAGE.rglob("*.py")))


def scan_package() -> tuple[list[str], list[str]]:
    """Scan every module of the llmproxy package.

    Returns:
        The violations and the allowed exceptions used, over all files,
        with paths relative to the repository.
    """
    violations: list[str] = []
    allowed: list[str] = []
    for file in _sources():
        name = str(file.relative_to(PACKAGE.parent))
        found, used = scan_source(file.read_text(encoding="utf-8"), name)
        violations.extend(found)
        allowed.extend(used)
    return violations, allowed


def test_llmproxy_uses_only_public_twisted_names() -> None:
    """No module of llmproxy uses a private Twisted name (bar the one exception)."""
    violations, _ = scan_package()
    assert not violations, "private names used:\n" + "\n".join(violations)


def test_the_exception_is_kept_in_one_place() -> None:
    """The private IOpenSSLTrustRoot import appears in at most one file."""
    _, allowed = scan_package()
    files = {entry.split(":", 1)[0] for entry in allowed if " import " in entry}
    assert len(files) <= 1, allowed


VIOLATIONS = {
    "private module, from-import": "from twisted.web._newclient import HTTP11ClientProtocol\n",
    "private module, import": "import twisted.internet._sslverify\n",
    "private module, import as": "import twisted.internet._sslverify as sslverify\n",
    "private module, other name": "from twisted.internet._sslverify import OpenSSLCertificateOptions\n",
    "private name imported": "from twisted.web.client import _StandardEndpointFactory\n",
    "private name imported as": "from twisted.internet import _resolver as resolver\n",
    "attribute of another object": "def f(response):\n    return response._transport\n",
    "attribute of an attribute of self": "class A:\n    def f(self):\n        return self.response._transport\n",
    "attribute of a call": "def f(x):\n    return x()._y\n",
    "attribute of a name typed with a Twisted type": (
        "from twisted.web.iweb import IResponse\n"
        "class Own:\n    pass\n"
        "def f(response: Own | IResponse):\n    return response._transport\n"
    ),
    "Twisted private through an own-typed name": (
        "from twisted.web.http import Request\n"
        "class R(Request):\n    pass\n"
        "def f(request: R):\n    return request._cleanup\n"
    ),
    "attribute of an own-typed name shadowed in a closure": (
        "class Own:\n    pass\n"
        "def f(x: Own):\n    return lambda x: x._transport\n"
    ),
    "attribute of a Twisted module": (
        "from twisted.internet import tcp\n"
        "tcp._portNumber = 1\n"
    ),
    "getattr of a literal private name": "def f(x):\n    return getattr(x, '_transport', None)\n",
    "setattr of a literal private name": "def f(x):\n    setattr(x, '_disconnected', True)\n",
    "import_module of a private module": (
        "import importlib\n"
        "m = importlib.import_module('twisted.web._newclient')\n"
    ),
    "reading the allowed method on another object": (
        "def f(root, context):\n    root._addCACertsToContext(context)\n"
    ),
    "overriding a Twisted base's private method": (
        "from twisted.internet import tcp\n"
        "class P(tcp.Port):\n"
        "    def _logger(self): return None\n"
    ),
    "reading a Twisted base's private attribute through self": (
        "from twisted.web.http import Request\n"
        "class R(Request):\n"
        "    def f(self):\n"
        "        return self._cleanup()\n"
    ),
}


@pytest.mark.parametrize("source", VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_scanner_reports_each_kind_of_violation(source: str) -> None:
    """A snippet with one violation is reported, at its line."""
    violations, _ = scan_source(source, "snippet.py")
    assert len(violations) == 1, violations
    last = len(source.splitlines())
    assert violations[0].startswith(f"snippet.py:{last}: "), violations


CLEAN = '''\
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from zope.interface import implementer

import llmproxy.net
from llmproxy import metrics
from llmproxy.proxy import _errors as errors
from llmproxy.routing._pool import UpstreamPool


@implementer(IOpenSSLTrustRoot)
class Trust:
    def _addCACertsToContext(self, context):
        context.set_default_verify_paths()


class Page(Resource):
    isLeaf = True

    def __init__(self, pool):
        super().__init__()
        self._pool = pool
        self._helper()

    def _helper(self):
        return getattr(self, "_pool"), self.__class__.__name__, self.__dict__

    @classmethod
    def _build(cls):
        return cls._helper


class Root:
    def __init__(self, close):
        self._close = close

    def replace(self, other: Root, pool: "UpstreamPool | None") -> None:
        self._close = other._close
        later: metrics.Metrics = other.metrics
        return lambda: (pool._field, later._children, other._close)


def f(x):
    return (
        metrics._DNSCollector,
        errors._private,
        llmproxy.net.parse_ip,
        UpstreamPool._field,
        getattr(x, "public"),
        getattr(x, name_from_somewhere),
        x.__class__,
        x.public,
    )
'''


def test_scanner_accepts_clean_code() -> None:
    """Public Twisted names, own private names and the one exception pass."""
    violations, allowed = scan_source(CLEAN, "clean.py")
    assert violations == []
    assert allowed == [
        "clean.py:1: from twisted.internet._sslverify import IOpenSSLTrustRoot",
        "clean.py:14: def _addCACertsToContext",
    ]
