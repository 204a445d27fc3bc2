"""YAML loading: the loader, bounds on the document, duplicate keys, line numbers.

A document is bounded before anything walks or builds it with its aliases
followed: its size first, then the node graph the composer made (where an
alias is one more reference to the node it names). That graph is walked
once, each node once, so a "billion laughs" document costs what its text
does, and is refused for what it would expand to.
"""

from __future__ import annotations

import re

import yaml

from llmproxy.config._model import ConfigError, ConfigErrors
from llmproxy.config._secrets import HIDDEN_KEY
from llmproxy.config._values import _key_path

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: The largest config accepted, in bytes (a config is a few KiB).
MAX_BYTES = 1024 * 1024

#: The most nodes (mappings, lists, keys, values) aliases may add to a
#: document: its size with every alias replaced by a copy of what it names,
#: less its size as written.
MAX_ALIAS_NODES = 10_000

#: The most aliases (``*name``, merges included) a document may hold.
MAX_ALIASES = 1_000

#: The deepest nesting, aliases followed (a config needs fewer than 10).
MAX_DEPTH = 64


def _line_of(text: str | bytes, position: int) -> int:
    """The 1-based line holding character ``position`` of ``text``."""
    newline = b"\n" if isinstance(text, bytes) else "\n"
    return text[:position].count(newline) + 1


def _check_size(text: str | bytes, source: str) -> None:
    """Refuse a document over :data:`MAX_BYTES` (UTF-8 bytes for text).

    Args:
        text: The document.
        source: Its name, for the message.

    Raises:
        ConfigError: For ``source``: the document is too large.
    """
    size = len(text)
    if isinstance(text, str) and size <= MAX_BYTES:
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise ConfigError(
            source, f"larger than {MAX_BYTES // 2**20} MiB: a config file is never that big"
        )


def _children(node: yaml.Node) -> list[yaml.Node]:
    """A node's children in document order (a mapping's keys and values)."""
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_bounds(root: yaml.Node, source: str) -> None:
    """Refuse a composed document that is too big once aliases are followed.

    Each node is visited once (iteratively, in post-order) and its size
    and depth with aliases followed are computed from its children's, so
    the cost is that of the text, whatever the document expands to.

    Args:
        root: The composed document.
        source: Its name, for the message.

    Raises:
        ConfigError: For ``source``: aliases adding more than
            :data:`MAX_ALIAS_NODES` nodes, more than :data:`MAX_ALIASES`
            aliases, nesting deeper than :data:`MAX_DEPTH`, or an alias
            inside the node it names.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    references = 0
    # (node, its children are done): each node is pushed False, then True.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = _children(node)
        if done:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(child)] for child in children)
            depth[id(node)] = 1 + max((depth[id(child)] for child in children), default=0)
            if depth[id(node)] > MAX_DEPTH:
                raise ConfigError(
                    source, f"the YAML document is nested more than {MAX_DEPTH} levels deep"
                )
        elif id(node) in open_nodes:
            # Pushed again from below itself: an alias to an ancestor.
            raise ConfigError(
                source,
                f"an alias refers to the node holding it (anchored at line "
                f"{node.start_mark.line + 1}): a config cannot be recursive",
            )
        elif id(node) not in size:
            open_nodes.add(id(node))
            references += len(children)
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(children))
    # Every node but the root is referenced once where it is written; any
    # other reference is an alias.
    aliases = references - (len(size) - 1)
    if aliases > MAX_ALIASES:
        raise ConfigError(source, f"the YAML document has more than {MAX_ALIASES:,} aliases")
    if size[id(root)] - len(size) > MAX_ALIAS_NODES:
        raise ConfigError(
            source,
            f"aliases expand the YAML document by more than {MAX_ALIAS_NODES:,} nodes",
        )


def _check_duplicates(node: yaml.Node, path: str) -> None:
    """Refuse a mapping that names the same key twice (YAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                where = _key_path(path, key)
                if key in seen:
                    what = "duplicate key" if where != path else f"a key {HIDDEN_KEY} given twice"
                    raise ConfigError(
                        where, f"{what} (lines {seen[key]} and {line}); give it once"
                    )
                seen[key] = line
                _check_duplicates(value_node, where)
            else:
                _check_duplicates(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]")


def key_marks(root: yaml.Node) -> dict[str, tuple[int, int]]:
    """Where each key path of a (bounded) document is: its 1-based line and
    column, at the key for a mapping's entry and at the item for a list's.

    Key paths are spelled as messages spell them (``target_map["/v1/"]``,
    ``auth.keys[0].name``); a secret mapping's keys share its path.

    Args:
        root: The composed document, checked by :func:`_check_bounds`.

    Returns:
        The places, by key path.
    """
    marks: dict[str, tuple[int, int]] = {}
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                where = path
                if isinstance(key_node, yaml.ScalarNode):
                    where = _key_path(path, str(key_node.value))
                    mark = key_node.start_mark
                    marks.setdefault(where, (mark.line + 1, mark.column + 1))
                stack.append((value_node, where))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                where = f"{path}[{i}]"
                marks.setdefault(where, (item.start_mark.line + 1, item.start_mark.column + 1))
                stack.append((item, where))
    return marks


#: The last part of a key path: ``.name``, ``["key"]`` or ``[0]``.
_LAST_PART = re.compile(r'(?:\.[A-Za-z0-9_-]+|\["(?:[^"\\]|\\.)*"\]|\[\d+\])\Z')


def located(error: ConfigError, marks: dict[str, tuple[int, int]]) -> ConfigError:
    """Give ``error`` (each of its mistakes) the line and column of its key
    path, or of the nearest parent the file has.

    Args:
        error: A ConfigError (or ConfigErrors).
        marks: :func:`key_marks` of the document.

    Returns:
        ``error``, its mistakes in file order when there are several.
    """
    for mistake in error.errors:
        path = mistake.key
        while path and path not in marks:
            shorter = _LAST_PART.sub("", path)
            if shorter == path:
                break
            path = shorter
        if path in marks:
            mistake.line, mistake.column = marks[path]
    if len(error.errors) > 1:
        return ConfigErrors(sorted(
            error.errors, key=lambda e: (e.line is not None, e.line or 0, e.column or 0)
        ))
    return error
