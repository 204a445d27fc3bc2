"""Who is calling, are they allowed in, and how often.

The policy is pure: no I/O, and no reading of the time but through the
clocks it is given.

* :func:`client_ip`: the client's address, believing ``X-Forwarded-For`` and
  ``X-Real-IP`` only when they come from a trusted proxy.
* :class:`RateLimiter`: per-client token buckets on an injected clock, in a
  table bounded both in size and by expiry.
* :class:`KeyStore` and :func:`presented_key`: client API keys (from an
  :class:`~llmproxy.config.AuthConfig`, keys file entries included),
  compared in constant time against stored SHA-256 digests and named by
  non-secret ids (:class:`KeyInfo`).
* :class:`Limits`: the rate limit and the token budgets of one request,
  giving a :class:`Verdict` (:data:`ALLOWED`, or an outcome among
  :data:`RATE_LIMITED`, :data:`OVER_BUDGET` and :data:`STORE_DOWN`), over
  a store: :class:`MemoryStore` in this process, or :class:`RedisStore`
  shared through Redis (the only I/O here; it fails with
  :class:`StoreError`). Both stores are Twisted services.
  :func:`budget_window` names the calendar window a budget counts in.

Importing this package does not import txredisapi (which installs the
global reactor): a :class:`RedisStore` imports it when it is made.
"""

from __future__ import annotations

from llmproxy.limits._address import client_ip
from llmproxy.limits._keys import KeyInfo, KeyStore, presented_key
from llmproxy.limits._rate import RateLimiter, retry_after
from llmproxy.limits._redis import RedisStore
from llmproxy.limits._redis_client import StoreError
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
    "KeyInfo",
    "KeyStore",
    "Limits",
    "MemoryStore",
    "RateLimiter",
    "RedisStore",
    "StoreError",
    "Verdict",
    "budget_window",
    "client_ip",
    "presented_key",
    "retry_after",
]
