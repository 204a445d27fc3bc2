"""Who may use the proxy: the client's address and key, and what a limit's
verdict means for the client."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.web.server import Request

from llmproxy.limits import (
    MODEL_NOT_ALLOWED,
    NO_PRICE,
    OK,
    OVER_BUDGET,
    RATE_LIMITED,
    KeyInfo,
    KeyStore,
    Limits,
    Verdict,
    client_ip,
    presented_key,
    retry_after,
)
from llmproxy.net import NetworkSet


@attrs.frozen
class Guard:
    """Who may use the proxy, and how much.

    Attributes:
        trusted: Peers whose X-Forwarded-For / X-Real-IP are believed.
        keys: Client keys, or None for an open proxy.
        limits: The rate limit and the keys' budgets, or None.
        limit_by_key: Buckets per client key instead of per IP.
    """

    trusted: NetworkSet = attrs.field(factory=lambda: NetworkSet(()))
    keys: KeyStore | None = None
    limits: Limits | None = None
    limit_by_key: bool = False


@attrs.frozen
class Refusal:
    """A request turned away before anything went upstream.

    Attributes:
        status: The HTTP status.
        message: What the client is told.
        type: The OpenAI error type.
        code: The error code (also in the access record).
        retry_after: Seconds for ``Retry-After``, if any.
    """

    status: int
    message: str
    type: str
    code: str
    retry_after: int | None = None


_NO_KEY = Refusal(
    401, "a valid API key is required (Authorization: Bearer KEY or x-api-key)",
    "invalid_request_error", "invalid_api_key",
)


def identify(
    guard: Guard, request: Request, record: dict[str, Any]
) -> tuple[str | None, KeyInfo | None] | Refusal:
    """Find the client's address and key, noting both in the access record.

    Args:
        guard: The proxy's guard.
        request: The client's request.
        record: The access record.

    Returns:
        ``(address, key)`` (the key is None without ``auth``), or a 401
        refusal when keys are required and this one is missing or unknown.
    """
    peer = getattr(request.getClientAddress(), "host", None)
    address = record["client_ip"] = client_ip(peer, request.requestHeaders, guard.trusted)
    if guard.keys is None:
        return address, None
    key = guard.keys.lookup(presented_key(request.requestHeaders))
    if key is None:
        return _NO_KEY
    record["client_key"] = key.id
    if key.name is not None:
        record["key_name"] = key.name
    return address, key


def no_route(path: bytes) -> Refusal:
    """The 404 for a path no ``target_map`` entry matches."""
    shown = path.decode("utf-8", "replace")
    return Refusal(404, f"no route for path {shown!r}", "invalid_request_error",
                   "route_not_found")


def bucket_of(guard: Guard, address: str | None, key: KeyInfo | None) -> str:
    """The rate-limit bucket a client counts against: its key or address."""
    if guard.limit_by_key and key is not None:
        return key.id
    return address or "unknown"


#: The longest model name an error message repeats whole.
_SHOWN_MODEL = 100
#: Why a request whose model llmproxy cannot read is refused a key's policy.
_UNREAD_MODEL = ('llmproxy cannot read which model this request names: send a JSON '
                 'body with a top-level "model" string')


def refusal_for(verdict: Verdict, key: KeyInfo | None, model: str | None = None) -> Refusal | None:
    """What the client is told for a limit's verdict (None: let through).

    Args:
        verdict: The limits' verdict.
        key: The client's key (named in a budget's or a policy's message).
        model: The model the request asked for (named in a policy's
            message).

    Returns:
        A 403 for a model the key may not use (or, under a money budget,
        one without a price), a 429 for the rate limit or a spent budget, a
        503 when the store is down and ``on_store_error`` is ``deny``, else
        None.
    """
    outcome = verdict.outcome
    if outcome == OK:
        return None
    name = key.name if key is not None else None
    if model is not None and len(model) > _SHOWN_MODEL:
        model = model[:_SHOWN_MODEL] + "..."
    if outcome == MODEL_NOT_ALLOWED:
        return Refusal(
            403, f"the key {name!r} may not use the model {model!r}" if model is not None
            else f"the key {name!r} may use only some models, and {_UNREAD_MODEL}",
            "invalid_request_error", "model_not_allowed",
        )
    if outcome == NO_PRICE:
        return Refusal(
            403, f"the model {model!r} has no price in llmproxy's prices, and the key "
            f"{name!r} has a budget in US dollars: ask the operator to price it"
            if model is not None
            else f"the key {name!r} has a budget in US dollars, and {_UNREAD_MODEL}",
            "invalid_request_error", "model_not_priced",
        )
    seconds = retry_after(verdict.wait)
    if outcome == RATE_LIMITED:
        return Refusal(429, f"rate limit exceeded: retry in {seconds} s", "rate_limit_error",
                       "rate_limited", seconds)
    if outcome == OVER_BUDGET:
        return Refusal(
            429, f"the budget of key {name!r} cannot cover this request: it renews in "
            f"{seconds} s",
            "insufficient_quota", "insufficient_quota", seconds,
        )
    return Refusal(503, "the rate limit store is not answering; try again shortly",
                   "server_error", "limit_store_unavailable", seconds)
