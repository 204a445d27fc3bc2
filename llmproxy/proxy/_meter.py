"""A request's cost: what it may cost when admitted, what it cost when over.

A :class:`Meter` follows one request's usage. At admission it makes the
:class:`~llmproxy.limits.Ask` a budgeted key's reservation holds (the
body's input, bytes / 4, plus its output cap or the key's
``budget.reserve``); once a response comes it reads the body's usage; when
the request is over, :meth:`Meter.settle` notes the usage and its cost in
the access record and settles the reservation, exactly once:

- usage reported: charged as reported;
- no usage, but the upstream worked on it (a budgeted stream that ended or
  was cut off without usage, a client that left): charged an estimate,
  the input plus the output streamed so far (characters / 4; a JSON
  answer's bytes / 4; the whole output cap when the client left before the
  answer's head), never over the output cap, and marked
  ``usage_estimated``;
- nothing reached the upstream, or it answered with an error status and no
  usage: nothing is charged; the hold is let go.
"""

from __future__ import annotations

from typing import Any

from llmproxy.limits import Ask, KeyInfo, Limits, Prices, Reservation, Spend
from llmproxy.proxy._body import Body
from llmproxy.proxy._usage import Usage, UsageReader

_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")

#: Bytes of text (or of body) taken for one token in estimates.
BYTES_PER_TOKEN = 4


def _tokens(size: int) -> int:
    """Tokens estimated for ``size`` bytes (rounded up)."""
    return -(-size // BYTES_PER_TOKEN)


def ask_for(body: Body, key: KeyInfo, model: str | None) -> Ask | None:
    """What a request may cost: its input (body bytes / 4) and its output
    cap (``max_tokens`` and the like), or the key's ``budget.reserve``.

    Args:
        body: The request body.
        key: The client's key.
        model: The model the request goes upstream for.

    Returns:
        The ask; None for a request without a body (listing the models,
        say), which generates nothing: it names no model, holds nothing and
        is charged only what its answer reports.
    """
    if not body.raw:
        return None
    cap = body.output_cap()
    if cap is None:
        cap = key.budget.reserve if key.budget is not None else 0
    return Ask(model, _tokens(len(body.raw)), cap)


class Meter:
    """Reads a response's usage and settles the request's cost.

    Attributes:
        wanted: Whether usage is read even without a budget (logs, metrics).
        key: The budgeted key the request is charged to, once admitted.
        reader: Reads the response body's usage, once a response came (and
            only when someone wants it).
        sent: Whether the request is with an upstream now (for a client
            that leaves before the answer's head).
    """

    def __init__(self, wanted: bool, prices: Prices | None = None) -> None:
        """Meter one request.

        Args:
            wanted: Whether usage is logged or counted even without a budget.
            prices: What models cost, for ``cost_usd``.
        """
        self.wanted = wanted
        self._prices = prices
        self.key: KeyInfo | None = None
        self._limits: Limits | None = None
        self._reservation: Reservation | None = None
        self._ask: Ask | None = None
        self.reader: UsageReader | None = None
        self.sent = False

    def admitted(
        self, limits: Limits, key: KeyInfo | None, ask: Ask | None,
        reservation: Reservation | None,
    ) -> None:
        """The request was admitted: charge ``key`` when it is over.

        Args:
            limits: The limits that keep the budgets.
            key: The client's key (charged only when it has a budget).
            ask: What the request was admitted for.
            reservation: What the admission holds, if anything.
        """
        self._limits = limits
        self._reservation = reservation
        if key is not None and key.budget is not None:
            self.key, self._ask = key, ask

    def read(self, content_type: bytes | None, content_encoding: bytes | None) -> None:
        """A response came: read its body's usage if anyone wants it (and its
        streamed text, for an estimate, when a budget is charged)."""
        if self.wanted or self.key is not None:
            self.reader = UsageReader(
                content_type, content_encoding, count_text=self.key is not None
            )

    def forget(self) -> None:
        """The response was not the one that counts (its body failed early)."""
        self.reader = None

    def settle(self, record: dict[str, Any], outcome: str) -> None:
        """The request is over: note its usage and cost, charge its key.

        Args:
            record: The access record, which gets the token counts,
                ``cost_usd`` and ``usage_estimated``.
            outcome: The request's outcome.
        """
        usage = self.reader.finish() if self.reader is not None else Usage()
        for name in _USAGE_FIELDS:
            value = getattr(usage, name)
            if value is not None:
                record[name] = value
        if usage.model is not None:
            record["upstream_model"] = usage.model
        spend = self._spend(usage, record, outcome)
        if spend is not None and self._prices is not None:
            cost = self._prices.cost(
                spend.model, spend.prompt_tokens, spend.completion_tokens,
                spend.cached_tokens,
            )
            if cost:
                record["cost_usd"] = round(cost, 9)
        if self._limits is not None:
            self._limits.settle(self._reservation, spend)

    def _spend(self, usage: Usage, record: dict[str, Any], outcome: str) -> Spend | None:
        """What the request cost: its usage, an estimate, or None."""
        ask = self._ask
        model = usage.model or (ask.model if ask is not None else record.get("model"))
        if usage.prompt_tokens is not None or usage.completion_tokens is not None:
            return Spend(
                model, usage.prompt_tokens or 0, usage.completion_tokens or 0,
                usage.cached_tokens or 0,
            )
        if self.key is None or ask is None:
            return None
        if self.reader is None:
            # No answer's head: the upstream has it only if the client left
            # while it was there, generating blind.
            if outcome != "client_closed" or not self.sent:
                return None
            output = ask.output_tokens
        else:
            status = record.get("status")
            if isinstance(status, int) and status >= 400:
                return None
            metrics = self._limits.metrics if self._limits is not None else None
            if metrics is not None:
                metrics.budget_usage_missing.labels(self.key.label).inc()
            if record.get("stream"):
                output = _tokens(self.reader.text_chars)
            else:
                output = _tokens(record.get("bytes_out") or 0)
            output = min(output, ask.output_tokens)
        record["prompt_tokens"] = ask.input_tokens
        record["completion_tokens"] = output
        record["total_tokens"] = ask.input_tokens + output
        record["usage_estimated"] = True
        return Spend(model, ask.input_tokens, output)
