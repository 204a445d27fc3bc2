"""Budgets that hold across processes: reservations in Redis.

Each test starts its own redis-server (tests/redis_server.py), or a fake
server that holds its replies. Several :class:`Limits`, each with its own
connection, stand for several daemons. The reactor does the I/O; each
store's timers run on a fake clock the tests advance, so that nothing
waits on the wall clock to show that something did not happen.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock

from conftest import timeout
from limit_fakes import PRICES, FakeMetrics, key
from llmproxy.limits import (
    OK,
    OVER_BUDGET,
    STORE_DOWN,
    Admission,
    Ask,
    Limits,
    Prices,
    RedisStore,
    Spend,
    StoreError,
    Verdict,
    budget_window,
)
from redis_server import RedisServer
from redis_server import redis_server  # noqa: F401 (a fixture)
from test_redis_store import RELAXED, FakeRedis, Stores, connected, until
from test_redis_store import fake_redis, stores  # noqa: F401 (fixtures)


def limits_on(
    store: RedisStore, reactor: Any, on_store_error: str = "allow", clock: Any = None,
    rate: float | None = None,
) -> tuple[Limits, FakeMetrics]:
    """Limits over ``store``, as one daemon would have them.

    Args:
        store: The Redis store.
        reactor: The running reactor: unix time for budget windows.
        on_store_error: ``allow`` or ``deny``.
        clock: Throttles the failure log (default: a fresh fake clock).
        rate: A global rate limit (burst 1), if any.

    Returns:
        ``(limits, metrics)``.
    """
    metrics = FakeMetrics()
    limits = Limits(
        store, clock or Clock(), rate, 1, on_store_error=on_store_error, metrics=metrics,
        wall_clock=reactor, prices=Prices(PRICES),
    )
    return limits, metrics


async def admission(answer: Any, reactor: Any) -> Admission:
    """Await an admission (bounded)."""
    assert isinstance(answer, Deferred), "a shared store answers later"
    result = await timeout(answer, reactor)
    assert isinstance(result, Admission)
    return result


def redis_keys(kind: str, name: str, slot: str) -> str:
    """The Redis key of a budget's counter (``budget``), reservations
    (``held``) or their amounts (``held-amounts``)."""
    return f"llmproxy:{kind}:{name}:{slot}"


@pytest_twisted.ensureDeferred
async def test_two_daemons_cannot_both_take_the_last_of_a_budget(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """30 requests at once through two daemons, 10 tokens each, 100 left:
    exactly 10 are admitted; settling lets go of every hold."""
    first, _ = limits_on(await connected(stores.make(redis_server.url), reactor), reactor)
    second, _ = limits_on(await connected(stores.make(redis_server.url), reactor), reactor)
    team = key(tokens=100)
    answers = [
        (first if i % 2 else second).admit(None, team, Ask("m", 4, 6)) for i in range(30)
    ]
    done = await timeout(gatherResults(answers), reactor)
    outcomes = [a.verdict.outcome for a in done]
    assert outcomes.count(OK) == 10 and outcomes.count(OVER_BUDGET) == 20
    window, _ = budget_window("day", reactor.seconds())
    amounts = redis_keys("held-amounts", "team-a", window)
    assert await redis_server.command("HGET", amounts, "=total") == b"100"
    assert await redis_server.command("ZCARD", redis_keys("held", "team-a", window)) == 10
    status = await timeout(first.status(team), reactor)
    assert (status["used"], status["reserved"], status["remaining"]) == (0, 100, 0)
    for i, answer in enumerate(a for a in done if a.verdict.outcome == OK):
        (first if i % 2 else second).settle(answer.reservation, Spend("m", 3, 4))

    async def settled() -> bool:
        return await redis_server.command("GET", redis_keys("budget", "team-a", window)) == b"70"

    await until(reactor, settled, "every settle to be counted")
    assert await redis_server.command("EXISTS", amounts) == 0, "nothing held, nothing kept"
    status = await timeout(second.status(team), reactor)
    assert (status["used"], status["reserved"], status["remaining"]) == (70, 0, 30)


@pytest_twisted.ensureDeferred
async def test_a_reservation_past_its_time_is_dropped_by_the_next_call(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """A hold left by a daemon that died stops counting once its time is up."""
    limits, _ = limits_on(await connected(stores.make(redis_server.url), reactor), reactor)
    team = key(tokens=50)
    lost = await admission(limits.admit(None, team, Ask("m", 20, 20)), reactor)
    assert lost.verdict == Verdict(OK)
    window, ends = budget_window("day", reactor.seconds())
    held = redis_keys("held", "team-a", window)
    expiry = await redis_server.command("ZSCORE", held, lost.reservation.id)
    seconds, micros = await redis_server.command("TIME")
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    assert 4500 * 1000 - 5000 < float(expiry) - now_ms <= 4500 * 1000, "hold_ttl from now"
    for redis_key in (held, redis_keys("held-amounts", "team-a", window)):
        assert await redis_server.command("EXPIRETIME", redis_key) >= int(ends)
    refused = await admission(limits.admit(None, team, Ask("m", 20, 20)), reactor)
    assert refused.verdict.outcome == OVER_BUDGET
    # Its time is up (as if hold_ttl had passed on Redis's clock).
    await redis_server.command("ZADD", held, "XX", 1, lost.reservation.id)
    again = await admission(limits.admit(None, team, Ask("m", 20, 20)), reactor)
    assert again.verdict == Verdict(OK)
    assert await redis_server.command("ZSCORE", held, lost.reservation.id) is None
    status = await timeout(limits.status(team), reactor)
    assert (status["used"], status["reserved"]) == (0, 40)
    # The status read drops an expired hold too.
    await redis_server.command("ZADD", held, "XX", 1, again.reservation.id)
    status = await timeout(limits.status(team), reactor)
    assert status["reserved"] == 0


@pytest_twisted.ensureDeferred
async def test_settle_in_redis_charges_once(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """A second settle sends nothing; a spend of None only lets go."""
    limits, metrics = limits_on(await connected(stores.make(redis_server.url), reactor), reactor)
    team = key(usd=1.0)
    answer = await admission(limits.admit(None, team, Ask("gpt-4o", 1000, 100)), reactor)
    assert answer.reservation.amount == 3500 and answer.reservation.held
    other = await admission(limits.admit(None, team, Ask("gpt-4o", 1000, 100)), reactor)
    limits.settle(answer.reservation, Spend("gpt-4o", 400, 10))
    limits.settle(answer.reservation, Spend("gpt-4o", 400, 10))
    limits.settle(other.reservation, None)
    window, _ = budget_window("day", reactor.seconds())
    counter = redis_keys("budget", "team-a", f"usd:{window}")

    async def charged() -> bool:
        return (await timeout(limits.status(team), reactor))["reserved"] == 0

    await until(reactor, charged, "both holds to be let go")
    assert await redis_server.command("GET", counter) == b"1100"  # 400 * 2.5 + 10 * 10
    assert metrics.count("budget_usd", "team-a") == 0.0011


@pytest_twisted.ensureDeferred
async def test_redis_down_follows_on_store_error(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """allow: admitted holding nothing (its cost is charged later if Redis is
    back); deny: store_down. Settling and reading fail quietly, counted."""
    store = await connected(stores.make(redis_server.url), reactor)
    allow, metrics = limits_on(store, reactor, "allow")
    deny, deny_metrics = limits_on(store, reactor, "deny")
    team = key(tokens=100)
    await redis_server.stop()
    await until(reactor, lambda: not store.connected, "the store to notice")
    let_in = await admission(allow.admit(None, team, Ask("m", 5, 5)), reactor)
    assert let_in.verdict == Verdict(OK)
    assert let_in.reservation is not None and not let_in.reservation.held
    refused = await admission(deny.admit(None, team, Ask("m", 5, 5)), reactor)
    assert refused == Admission(Verdict(STORE_DOWN, 1.0))
    assert metrics.count("store_errors", "check") == 1
    assert deny_metrics.count("store_errors", "check") == 1
    assert allow.settle(let_in.reservation, Spend("m", 5, 5)) is None
    assert metrics.count("store_errors", "add_usage") == 1
    try:
        await timeout(allow.status(team), reactor)
    except StoreError:
        pass
    else:
        raise AssertionError("status should fail while Redis is down")
    assert metrics.count("store_errors", "status") == 1


@pytest_twisted.ensureDeferred
async def test_a_silent_redis_costs_at_most_the_store_timeout_per_call(
    reactor: Any, fake_redis: FakeRedis, stores: Stores
) -> None:
    """A server that never answers: the rate limit's call, then the budget's,
    each time out on the store's clock; settling never waits."""
    clock = Clock()
    store = await connected(stores.make(fake_redis.url, 0.05, clock=clock), reactor)
    limits, metrics = limits_on(store, reactor, "allow", rate=10.0)
    team = key(tokens=100)
    pending = limits.admit("1.2.3.4", team, Ask("m", 5, 5))
    await until(reactor, lambda: len(fake_redis.commands) == 1, "the rate limit's command")
    clock.advance(0.049)
    assert not pending.called
    clock.advance(0.002)
    answer = await admission(pending, reactor)
    assert answer.verdict == Verdict(OK) and not answer.reservation.held
    second = limits.admit(None, team, Ask("m", 5, 5))
    seen: list[Admission] = []
    second.addCallback(lambda done: seen.append(done) or done)
    await until(reactor, lambda: len(fake_redis.commands) == 2, "the budget's command")
    assert seen == []
    clock.advance(0.051)
    assert (await admission(second, reactor)).verdict == Verdict(OK)
    limits.settle(answer.reservation, Spend("m", 1, 1))
    await until(reactor, lambda: len(fake_redis.commands) == 3, "the settle's command")
    clock.advance(0.051)
    assert metrics.count("store_errors", "check") == 2
    assert metrics.count("store_errors", "add_usage") == 1


@pytest_twisted.ensureDeferred
async def test_garbage_in_a_budget_counter_is_a_store_error(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """A counter that is not an integer fails the script, never the daemon."""
    limits, metrics = limits_on(
        await connected(stores.make(redis_server.url, RELAXED), reactor), reactor, "deny"
    )
    window, _ = budget_window("day", reactor.seconds())
    await redis_server.command("SET", redis_keys("budget", "team-a", window), "lots")
    answer = await admission(limits.admit(None, key(tokens=9), Ask("m", 1, 1)), reactor)
    assert answer.verdict.outcome == STORE_DOWN
    assert metrics.count("store_errors", "check") == 1
