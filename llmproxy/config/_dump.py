"""The effective config as YAML, secrets hidden (what ``--check`` prints)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from llmproxy.config._model import ClientKey, Config, redact_url


def dump_config(config: Config) -> str:
    """The effective config as YAML, secrets redacted.

    Args:
        config: A validated configuration.

    Returns:
        YAML text: every key with its value or default; the proxy password,
        route api_keys and client keys shown as ``***``.
    """
    return yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False)


def _plain(value: Any, key: str = "") -> Any:
    """Turn config objects into YAML-able data, hiding secrets."""
    if isinstance(value, ClientKey):
        if value.name is None and value.budget is None:
            return "***"
        return {"key": "***", "name": value.name, "budget": _plain(value.budget)}
    if attrs.has(type(value)):
        return {
            field.name: _plain(getattr(value, field.name), field.name)
            for field in attrs.fields(type(value))
            if field.name != "source"
        }
    if isinstance(value, Mapping):
        return {k: _plain(v, k) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v, "" if key == "keys" else key) for v in value]
    if key == "api_key" and value is not None:
        return "***"
    if key in ("proxy_url", "store") and value is not None:
        return redact_url(value).strip("'")
    return value
