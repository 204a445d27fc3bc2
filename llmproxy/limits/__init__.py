"""Who is calling, are they allowed in, and how often: pure request policy.

Three independent pieces, all without I/O (except :meth:`KeyStore.from_config`
reading a keys file once, at construction) and without reading the time
themselves:

* :func:`client_ip`: the client's address, believing ``X-Forwarded-For`` and
  ``X-Real-IP`` only when they come from a trusted proxy.
* :class:`RateLimiter`: per-client token buckets on an injected clock, in a
  table bounded both in size and by expiry.
* :class:`KeyStore` and :func:`presented_key`: client API keys, compared in
  constant time against stored SHA-256 digests and named by non-secret ids.
"""

from __future__ import annotations

from llmproxy.limits._address import client_ip
from llmproxy.limits._keys import KeyInfo, KeyStore, presented_key
from llmproxy.limits._rate import RateLimiter, retry_after
from llmproxy.limits._store import (
    ALLOWED,
    OK,
    OVER_BUDGET,
    RATE_LIMITED,
    STORE_DOWN,
    Limits,
    MemoryStore,
    Verdict,
    budget_window,
)

__all__ = [
    "ALLOWED",
    "OK",
    "OVER_BUDGET",
    "RATE_LIMITED",
    "STORE_DOWN",
    "Limits",
    "MemoryStore",
    "Verdict",
    "budget_window",
    "KeyInfo",
    "KeyStore",
    "RateLimiter",
    "client_ip",
    "presented_key",
    "retry_after",
]
