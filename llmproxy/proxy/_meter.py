"""A request's token usage: read from its response, counted for its key."""

from __future__ import annotations

from typing import Any

from llmproxy.limits import KeyInfo, Limits
from llmproxy.proxy._usage import UsageReader

_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")


class Meter:
    """Reads a response's usage and settles it: the access record's token
    counts, and the key's budget.

    Attributes:
        wanted: Whether usage is read even without a budget.
        key: The key whose budget the request counts against, if any.
        reader: Reads the response body's usage, once a response came (and
            only when someone wants it).
    """

    def __init__(self, wanted: bool, key: KeyInfo | None, limits: Limits | None) -> None:
        """Meter one request.

        Args:
            wanted: Whether usage is logged or counted even without a budget.
            key: The client's key, counted only when it has a budget.
            limits: The limits that keep the budgets.
        """
        self.wanted = wanted
        self.key = key if key is not None and key.budget is not None and limits else None
        self._limits = limits
        self.reader: UsageReader | None = None

    def read(self, content_type: bytes | None, content_encoding: bytes | None) -> None:
        """A response came: read its body's usage if anyone wants it."""
        if self.wanted or self.key is not None:
            self.reader = UsageReader(content_type, content_encoding)

    def forget(self) -> None:
        """The response was not the one that counts (its body failed early)."""
        self.reader = None

    def settle(self, record: dict[str, Any], outcome: str) -> None:
        """The request is over: note its usage and count it for the key.

        Args:
            record: The access record, which gets the token counts.
            outcome: The request's outcome (an ``error`` is never counted).
        """
        if self.reader is None:
            return
        usage = self.reader.finish()
        for name in _USAGE_FIELDS:
            value = getattr(usage, name)
            if value is not None:
                record[name] = value
        if usage.model is not None:
            record["upstream_model"] = usage.model
        if self.key is not None and self._limits is not None and outcome != "error":
            if usage.prompt_tokens is None and usage.completion_tokens is None:
                tokens = None
            else:
                tokens = (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
            self._limits.record_usage(self.key, tokens)
