"""Who is calling, are they allowed in, how often, and at what cost.

The policy is pure: no I/O, and no reading of the time but through the
clocks it is given.

* :func:`client_ip`: the client's address, believing ``X-Forwarded-For`` and
  ``X-Real-IP`` only when they come from a trusted proxy.
* :class:`RateLimiter`: per-client token buckets on an injected clock, in a
  table bounded both in size and by expiry.
* :class:`KeyStore` and :func:`presented_key`: client API keys (from an
  :class:`~llmproxy.config.AuthConfig`, keys file entries included),
  compared in constant time against stored SHA-256 digests and named by
  non-secret ids; each key's policy is a :class:`KeyInfo` (its models, its
  own rate limit, its budget in tokens or US dollars).
* :class:`Prices`: what a model's tokens cost, from ``prices``.
* :class:`Limits`: one request's admission (:meth:`Limits.admit`: the key's
  models, the rate limit, the key's budget, holding what an :class:`Ask`
  may cost as a :class:`Reservation`) and its end (:meth:`Limits.settle`:
  the hold let go, the :class:`Spend` charged), giving a :class:`Verdict`
  (:data:`OK`, or an outcome among :data:`RATE_LIMITED`,
  :data:`OVER_BUDGET`, :data:`STORE_DOWN`, :data:`NO_PRICE` and
  :data:`MODEL_NOT_ALLOWED`) in an :class:`Admission`; over a store:
  :class:`MemoryStore` in this process, or :class:`RedisStore` shared
  through Redis (the only I/O here; it fails with :class:`StoreError`).
  Both stores are Twisted services. :func:`budget_window` names the
  calendar window a budget counts in.

Importing this package does not import txredisapi (which installs the
global reactor): a :class:`RedisStore` imports it when it is made.
"""

from __future__ import annotations

from llmproxy.limits._address import client_ip
from llmproxy.limits._budget import (
    ALLOWED,
    MODEL_NOT_ALLOWED,
    NO_PRICE,
    OK,
    OVER_BUDGET,
    RATE_LIMITED,
    STORE_DOWN,
    Admission,
    Ask,
    Reservation,
    Spend,
    Verdict,
    budget_window,
)
from llmproxy.limits._keys import KeyInfo, KeyStore, presented_key
from llmproxy.limits._ledger import Ledger
from llmproxy.limits._limits import Limits
from llmproxy.limits._memory import MemoryStore
from llmproxy.limits._prices import Prices
from llmproxy.limits._rate import RateLimiter, retry_after
from llmproxy.limits._redis import RedisStore
from llmproxy.limits._redis_client import StoreError

__all__ = [
    "ALLOWED",
    "MODEL_NOT_ALLOWED",
    "NO_PRICE",
    "OK",
    "OVER_BUDGET",
    "RATE_LIMITED",
    "STORE_DOWN",
    "Admission",
    "Ask",
    "KeyInfo",
    "KeyStore",
    "Ledger",
    "Limits",
    "MemoryStore",
    "Prices",
    "RateLimiter",
    "RedisStore",
    "Reservation",
    "Spend",
    "StoreError",
    "Verdict",
    "budget_window",
    "client_ip",
    "presented_key",
    "retry_after",
]
