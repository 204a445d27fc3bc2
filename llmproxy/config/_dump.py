"""The effective config as YAML, secrets hidden (what ``--check`` prints)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from llmproxy.config._model import Config, RouteConfig, redact_url
from llmproxy.config._policy import BudgetConfig, ClientKey

#: Fields that say where something came from, not what it is.
_NOT_SHOWN = ("source", "origin")


def dump_config(config: Config) -> str:
    """The effective config as YAML, secrets redacted.

    Args:
        config: A validated configuration.

    Returns:
        YAML text: every key with its value or default; the proxy password,
        route api_keys and client keys (plain or ``key_sha256``) shown as
        ``***``.
    """
    plain = _plain(config)
    plain["metrics"] = {"enabled": plain["metrics"], "max_models": plain.pop("metrics_max_models")}
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)


def _client_key(value: ClientKey) -> Any:
    """A client key: ``***``, or its policy with the key as ``***``."""
    policy = {
        "name": value.name,
        "budget": _plain(value.budget),
        "models": _plain(value.models),
        "rate_limit": _plain(value.rate_limit),
    }
    if all(v is None for v in policy.values()):
        return "***"
    return {"key": "***", **policy}


def _route(value: RouteConfig) -> dict[str, Any]:
    """A route as it is written: weighted URLs as ``{url, weight}`` entries
    (there is no ``weights`` key)."""
    route = {
        field.name: _plain(getattr(value, field.name), field.name)
        for field in attrs.fields(RouteConfig) if field.name != "weights"
    }
    if value.weights is not None:
        route["urls"] = [
            {"url": url, "weight": weight} for url, weight in zip(value.urls, value.weights)
        ]
    return route


def _plain(value: Any, key: str = "") -> Any:
    """Turn config objects into YAML-able data, hiding secrets."""
    if isinstance(value, ClientKey):
        return _client_key(value)
    if isinstance(value, RouteConfig):
        return _route(value)
    if isinstance(value, BudgetConfig):
        return value.as_written()
    if attrs.has(type(value)):
        return {
            field.name: _plain(getattr(value, field.name), field.name)
            for field in attrs.fields(type(value))
            if field.name not in _NOT_SHOWN
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
