"""YAML loading: the loader, duplicate-key detection and line numbers."""

from __future__ import annotations

import yaml

from llmproxy.config._model import ConfigError
from llmproxy.config._secrets import HIDDEN_KEY
from llmproxy.config._values import _key_path

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _line_of(text: str | bytes, position: int) -> int:
    """The 1-based line holding character ``position`` of ``text``."""
    newline = b"\n" if isinstance(text, bytes) else "\n"
    return text[:position].count(newline) + 1


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
