"""Routing: (path, model) -> the pool of upstream base URLs to use.

Pure logic, no I/O: the proxy asks :class:`Router` where a request goes and
:class:`UpstreamPool` which of its base URLs takes this turn. Pools keep
passive health state (consecutive failures, ejection with a cooldown and a
single trial request) from what the proxy reports, and read time only from
the ``clock`` they are given.
"""

from __future__ import annotations

from llmproxy.routing._pool import MAX_COOLDOWN, UpstreamPool
from llmproxy.routing._model import (
    MAX_CANDIDATES,
    Member,
    extract_model,
    find_members,
    replace_value,
    string_value,
)
from llmproxy.routing._router import Route, Router
from llmproxy.routing._tries import Tries

__all__ = [
    "MAX_CANDIDATES",
    "MAX_COOLDOWN",
    "Member",
    "Route",
    "Router",
    "Tries",
    "UpstreamPool",
    "extract_model",
    "find_members",
    "replace_value",
    "string_value",
]
