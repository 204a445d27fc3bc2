"""Keys as policies and budgets that hold, in one process.

:class:`Limits` over the memory store, every clock a fake one: what a key
may name, its own rate limit, budgets in tokens and dollars that hold what
requests in flight may cost, settling exactly once, and holds that expire
when their request never ends.
"""

from __future__ import annotations

from typing import Any

import pytest

from limit_fakes import PRICES, START, FakeMetrics, key, memory_limits
from llmproxy.config import parse_config_text
from llmproxy.limits import (
    MODEL_NOT_ALLOWED,
    NO_PRICE,
    OK,
    OVER_BUDGET,
    RATE_LIMITED,
    Admission,
    Ask,
    KeyInfo,
    Limits,
    MemoryStore,
    Prices,
    Reservation,
    Spend,
    Verdict,
)


def admitted(admission: Any) -> Admission:
    """An admission the memory store gave at once.

    Args:
        admission: What :meth:`Limits.admit` returned.

    Returns:
        It, checked not to be a Deferred.
    """
    assert isinstance(admission, Admission)
    return admission


# --- keys and prices ---------------------------------------------------------


@pytest.mark.parametrize(
    "models, model, allowed",
    [
        (None, "anything", True),
        (None, None, True),
        (("gpt-4o*",), None, False),
        (("gpt-4o*",), "gpt-4o-mini", True),
        (("gpt-4o*",), "gpt-4", False),
        (("gpt-4o*",), "GPT-4o", False),
        (("gpt-4o", "text-embedding-*"), "text-embedding-3-small", True),
        (("gpt-4o",), "gpt-4o-2024", False),
        (("m?",), "m1", True),
        (("m[ab]",), "mc", False),
    ],
)
def test_a_key_allows_the_models_its_globs_match(
    models: tuple[str, ...] | None, model: str | None, allowed: bool
) -> None:
    """No ``models``: everything; with ``models``, a body whose model cannot
    be read is refused (the upstream may read one); globs are
    case-sensitive fnmatch patterns.

    Args:
        models: The key's ``models``.
        model: The model a request names.
        allowed: Whether it may.
    """
    assert KeyInfo("key-x", models=models).allows(model) is allowed


def test_prices_exact_then_first_glob_and_cached_tokens() -> None:
    """An exact name wins; cached tokens are part of the prompt, priced at
    cached_input when given; labels are the price entries."""
    prices = Prices.from_config(PRICES)
    assert prices.price("gpt-4o") == PRICES["gpt-4o"]
    assert prices.price("gpt-4o-mini") == PRICES["gpt-*"]
    assert prices.price("llama") is None and prices.price(None) is None
    assert prices.label("gpt-4o") == "gpt-4o"
    assert prices.label("gpt-3.5") == "gpt-*"
    assert prices.label("llama") == "other" and prices.label(None) == "other"
    # 1000 prompt tokens (400 cached) and 100 completion tokens of gpt-4o.
    expected = (600 * 2.5 + 400 * 1.25 + 100 * 10.0) / 1e6
    assert prices.cost("gpt-4o", 1000, 100, cached_tokens=400) == pytest.approx(expected)
    # Without cached_input, cached tokens cost as input.
    assert prices.cost("gpt-3.5", 1000, 100, 400) == pytest.approx((1000 + 200) / 1e6)
    assert prices.cost("llama", 1, 1) is None
    assert prices.micro_dollars("gpt-4o", 1, 0) == 3  # 2.5 micro-dollars, rounded up
    assert prices.micro_dollars("gpt-4o", 2, 0) == 5


# --- admitting -----------------------------------------------------------------


def test_thirty_requests_at_once_get_only_what_fits() -> None:
    """Requests held but not yet settled count: of 30 asking 10 tokens with
    95 left, 9 are admitted; one token short, none is."""
    limits, _, metrics = memory_limits()
    team = key(tokens=100)
    limits.settle(admitted(limits.admit(None, team, Ask("m", 0, 1))).reservation,
                  Spend("m", 3, 2))
    answers = [admitted(limits.admit(None, team, Ask("m", 4, 6))) for _ in range(30)]
    assert [a.verdict.outcome for a in answers] == [OK] * 9 + [OVER_BUDGET] * 21
    assert all(a.reservation is not None and a.reservation.held for a in answers[:9])
    assert all(a.reservation is None for a in answers[9:])
    assert metrics.count("budget_refused", "team-a") == 21
    assert limits.status(team) == {
        "unit": "tokens", "limit": 100, "used": 5, "reserved": 90, "remaining": 5,
        "window": "day:2026-12-03", "resets_at": START + 86400,
    }
    # Settled for less than held, room comes back.
    for answer in answers[:9]:
        limits.settle(answer.reservation, Spend("m", 4, 4))
    assert limits.status(team)["used"] == 5 + 9 * 8
    one_short = key(name="team-b", tokens=100)
    limits.settle(admitted(limits.admit(None, one_short, None)).reservation, Spend("m", 99, 0))
    outcomes = [admitted(limits.admit(None, one_short, Ask("m", 4, 6))).verdict.outcome
                for _ in range(30)]
    assert outcomes == [OVER_BUDGET] * 30
    assert admitted(limits.admit(None, one_short, Ask("m", 1, 0))).verdict == Verdict(OK)


def test_over_budget_waits_until_the_window_ends() -> None:
    """Retry-After is the window's end; the next window starts from zero."""
    limits, clock, _ = memory_limits()
    team = key(tokens=10, per="hour")
    clock.advance(600)
    first = admitted(limits.admit(None, team, Ask("m", 5, 5)))
    assert first.verdict == Verdict(OK)
    refused = admitted(limits.admit(None, team, Ask("m", 1, 0)))
    assert refused == Admission(Verdict(OVER_BUDGET, 3000.0))
    limits.settle(first.reservation, Spend("m", 5, 5))
    clock.advance(3000)
    assert admitted(limits.admit(None, team, Ask("m", 5, 5))).verdict == Verdict(OK)


def test_an_ask_larger_than_the_budget_holds_the_whole_budget() -> None:
    """A request may hold at most the budget, so an unused key is never locked out."""
    limits, _, _ = memory_limits()
    small = key(tokens=1000)  # the default reserve is 4096 output tokens
    first = admitted(limits.admit(None, small, Ask("m", 10, 4096)))
    assert first.verdict == Verdict(OK) and first.reservation.amount == 1000
    assert admitted(limits.admit(None, small, Ask("m", 1, 1))).verdict.outcome == OVER_BUDGET


def test_an_ask_of_unknown_cost_holds_nothing_while_something_is_left() -> None:
    """No ask: admitted (with an empty reservation) until the budget is spent."""
    limits, _, _ = memory_limits()
    team = key(tokens=10)
    blind = admitted(limits.admit(None, team, None))
    assert blind.verdict == Verdict(OK)
    assert blind.reservation.amount == 0 and not blind.reservation.held
    limits.settle(blind.reservation, Spend(None, 6, 4))
    assert admitted(limits.admit(None, team, None)).verdict.outcome == OVER_BUDGET


def test_a_key_without_a_budget_gets_no_reservation() -> None:
    """Nothing is held for a key without a budget, or for no key."""
    limits, _, _ = memory_limits()
    assert admitted(limits.admit(None, key(), Ask("m", 1, 1))) == Admission(Verdict(OK))
    assert admitted(limits.admit(None, None, Ask("m", 1, 1))) == Admission(Verdict(OK))


def test_models_are_checked_first_and_take_no_token() -> None:
    """A model the key may not name is refused before its rate limit."""
    limits, _, metrics = memory_limits()
    narrow = key(models=("gpt-4o*",), rate=(1, 1))
    for _ in range(3):
        answer = admitted(limits.admit(None, narrow, Ask("claude-3", 1, 1)))
        assert answer == Admission(Verdict(MODEL_NOT_ALLOWED))
    assert metrics.count("key_refused", "team-a", MODEL_NOT_ALLOWED) == 3
    assert admitted(limits.admit(None, narrow, Ask(None, 1, 1))) == Admission(
        Verdict(MODEL_NOT_ALLOWED)), "a body whose model cannot be read"
    assert admitted(limits.admit(None, narrow, Ask("gpt-4o", 1, 1))).verdict == Verdict(OK)
    # No ask (a request without a body) names no model: only its rate limit.
    assert admitted(limits.admit(None, narrow, None)).verdict.outcome == RATE_LIMITED


def test_a_keys_own_rate_limit_replaces_the_global_one() -> None:
    """The key's bucket is its id, at its rate; others use the global one."""
    limits, clock, _ = memory_limits(rate=1, burst=1)
    fast = key(name="fast", rate=(10, 3))
    outcomes = [admitted(limits.admit("1.2.3.4", fast, None)).verdict.outcome
                for _ in range(4)]
    assert outcomes == [OK, OK, OK, RATE_LIMITED]
    slow = key(name="slow")
    assert admitted(limits.admit("1.2.3.4", slow, None)).verdict == Verdict(OK)
    refused = admitted(limits.admit("1.2.3.4", slow, None)).verdict
    assert refused.outcome == RATE_LIMITED and refused.wait == pytest.approx(1.0)
    clock.advance(0.2)
    assert admitted(limits.admit("5.6.7.8", fast, None)).verdict == Verdict(OK)
    assert admitted(limits.admit(None, key(name="none"), None)).verdict == Verdict(OK)


def test_a_rate_limited_request_holds_nothing() -> None:
    """The rate limit comes before the budget: a refused request takes none of it."""
    limits, _, _ = memory_limits()
    limited = key(tokens=100, rate=(1, 1))
    assert admitted(limits.admit(None, limited, Ask("m", 10, 10))).verdict == Verdict(OK)
    assert admitted(limits.admit(None, limited, Ask("m", 10, 10))).verdict.outcome == (
        RATE_LIMITED)
    assert limits.status(limited)["reserved"] == 20


# --- dollars -------------------------------------------------------------------


def test_a_budget_in_dollars_prices_asks_and_spends() -> None:
    """Holds and charges are priced; an unpriced model is refused (no_price)."""
    limits, _, metrics = memory_limits()
    team = key(usd=0.01, reserve=100)
    assert admitted(limits.admit(None, team, Ask("llama", 1, 1))) == Admission(Verdict(NO_PRICE))
    assert admitted(limits.admit(None, team, Ask(None, 1, 1))).verdict.outcome == NO_PRICE
    assert metrics.count("key_refused", "team-a", NO_PRICE) == 2
    # 1000 input tokens and 100 output of gpt-4o: 2500 + 1000 micro-dollars.
    first = admitted(limits.admit(None, team, Ask("gpt-4o", 1000, 100)))
    assert first.verdict == Verdict(OK) and first.reservation.amount == 3500
    second = admitted(limits.admit(None, team, Ask("gpt-4o", 1000, 100)))
    assert second.verdict == Verdict(OK)
    third = admitted(limits.admit(None, team, Ask("gpt-4o", 1000, 100)))
    assert third.verdict.outcome == OVER_BUDGET
    # The answer names a model with no price: the asked model's price counts
    # (its 1000 prompt tokens read from cache: 1250 + 1000 micro-dollars).
    limits.settle(first.reservation, Spend("llama-3", 1000, 100, cached_tokens=1000))
    assert metrics.count("budget_usd", "team-a") == pytest.approx(0.00225)
    status = limits.status(team)
    assert status["unit"] == "usd" and status["limit"] == 0.01
    assert status["used"] == pytest.approx(0.00225) and status["reserved"] == 0.0035
    assert status["remaining"] == pytest.approx(0.01 - 0.00225 - 0.0035)
    limits.settle(second.reservation, None)
    assert limits.status(team)["reserved"] == 0


def test_a_spend_without_any_price_charges_nothing_and_is_counted() -> None:
    """An unknown ask (no model) and an unpriced spend: nothing charged, counted."""
    limits, _, metrics = memory_limits()
    team = key(usd=1.0)
    blind = admitted(limits.admit(None, team, None))
    limits.settle(blind.reservation, Spend("llama", 10, 10))
    assert metrics.count("budget_unpriced", "team-a") == 1
    assert limits.status(team)["used"] == 0


# --- settling ------------------------------------------------------------------


def test_settle_runs_once_and_never_raises() -> None:
    """A second settle does nothing; None reservations are ignored."""
    limits, _, metrics = memory_limits()
    team = key(tokens=100)
    answer = admitted(limits.admit(None, team, Ask("m", 10, 10)))
    limits.settle(answer.reservation, Spend("m", 5, 5))
    limits.settle(answer.reservation, Spend("m", 5, 5))
    limits.settle(None, Spend("m", 5, 5))
    assert answer.reservation.settled
    assert limits.status(team)["used"] == 10 and limits.status(team)["reserved"] == 0
    assert metrics.count("budget_tokens", "team-a") == 10


def test_a_hold_whose_request_never_ends_expires() -> None:
    """After hold_ttl, a reservation never settled stops counting; a late
    settle still charges."""
    limits, clock, _ = memory_limits(hold_ttl=100.0)
    team = key(tokens=20)
    lost = admitted(limits.admit(None, team, Ask("m", 10, 10)))
    assert admitted(limits.admit(None, team, Ask("m", 1, 0))).verdict.outcome == OVER_BUDGET
    clock.advance(99.9)
    assert limits.status(team)["reserved"] == 20
    clock.advance(0.1)
    assert limits.status(team)["reserved"] == 0
    again = admitted(limits.admit(None, team, Ask("m", 5, 5)))
    assert again.verdict == Verdict(OK)
    limits.settle(lost.reservation, Spend("m", 3, 0))
    assert limits.status(team) | {"window": "", "resets_at": 0} == {
        "unit": "tokens", "limit": 20, "used": 3, "reserved": 10, "remaining": 7,
        "window": "", "resets_at": 0,
    }


def test_ended_windows_are_forgotten() -> None:
    """The memory store keeps a counter a day past its window, then drops it."""
    limits, clock, _ = memory_limits()
    store = limits.store
    assert isinstance(store, MemoryStore)
    for minute in range(5):
        team = key(tokens=10, per="minute")
        limits.settle(admitted(limits.admit(None, team, Ask("m", 1, 1))).reservation,
                      Spend("m", 1, 1))
        clock.advance(60)
    assert store.budget_used("team-a", "minute:2026-12-03T00:00") == 2
    clock.advance(86400)
    assert store.budget_used("team-a", "minute:2026-12-03T00:00") == 0
    assert store.held("team-a", "minute:2026-12-03T00:04") == (0, 0)


def test_a_reload_carries_holds_and_use_over() -> None:
    """The new limits see what the old ones hold; old requests settle into it."""
    old, clock, _ = memory_limits()
    team = key(tokens=30)
    in_flight = admitted(old.admit(None, team, Ask("m", 10, 10)))
    new = Limits(MemoryStore(clock), clock, None, 1, wall_clock=clock, prices=old.prices)
    new.carry_over(old)
    assert new.status(team)["reserved"] == 20
    assert admitted(new.admit(None, team, Ask("m", 10, 10))).verdict.outcome == OVER_BUDGET
    old.settle(in_flight.reservation, Spend("m", 2, 3))
    assert new.status(team)["used"] == 5 and new.status(team)["reserved"] == 0


def test_from_config_builds_limits_only_when_something_is_checked() -> None:
    """No rate limit and no policies: None; models alone are enough."""
    base = 'target_map: {"/": "http://a"}\n'
    plain = parse_config_text(base + "auth: {keys: [k]}\n", environ={})
    assert Limits.from_config(plain, None) is None
    narrow = parse_config_text(base + "auth: {keys: [{key: k, models: [m]}]}\n", environ={})
    limits = Limits.from_config(narrow, None, FakeMetrics())
    assert isinstance(limits, Limits) and isinstance(limits.store, MemoryStore)
    timed = parse_config_text(
        base + "timeouts: {response_header: 60}\n"
        "auth: {keys: [{key: k, name: t, budget: 5/day}]}\n"
        "prices: {m: {input: 1, output: 1}}\n",
        environ={},
    )
    limits = Limits.from_config(timed, None)
    assert limits.hold_ttl == 60 + 3600
    assert limits.prices.price("m") is not None


def test_a_reservation_names_its_budget_without_the_key() -> None:
    """What a reservation carries is safe to log."""
    limits, _, _ = memory_limits()
    reservation = admitted(limits.admit(None, key(tokens=9), Ask("m", 1, 1))).reservation
    assert isinstance(reservation, Reservation)
    assert reservation.name == "team-a" and reservation.slot == "day:2026-12-03"
    dollars = admitted(limits.admit(None, key(usd=1.0), Ask("gpt-4o", 1, 1))).reservation
    assert dollars.slot == "usd:day:2026-12-03", "dollars count apart from tokens"
