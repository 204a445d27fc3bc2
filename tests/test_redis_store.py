"""RedisStore, the shared limit store, against a real redis-server.

Each test starts its own redis-server on a loopback port
(tests/redis_server.py). A few use a fake server on loopback instead, one
that holds its replies or answers nonsense, to check what a real one never
does: timeouts, late replies, the bound on waiting commands and replies of
the wrong type.

The reactor does the I/O; each store's timers (call timeouts, the close's
grace, the waits before reconnecting) run on a fake clock of its own that
the tests advance. No test sleeps to let something happen: it waits for
the event itself, a reactor turn at a time and bounded, except where
redis-server's own clock decides (two waits, each said why).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from conftest import timeout
from llmproxy.config import parse_redis_url
from llmproxy.limits import RedisStore, StoreError
from redis_server import RedisServer, RedisServers  # noqa: F401 (types)
from redis_server import redis_server, redis_servers  # noqa: F401 (fixtures)

#: The store timeout for tests that are not about timeouts: generous, so a
#: busy machine does not make them fail.
RELAXED = 2.0

#: Seconds a test waits for something to happen (a connection, a restart).
WAIT = 10.0

#: Clock seconds after which any reconnection is due: the store waits 2 s
#: at most between attempts.
ANY_RETRY = 2.5

PASSWORD = "s3cret-Pass-42"
WRONG_PASSWORD = "wr0ng-Pass-17"


class Stores:
    """RedisStores made for one test, closed after it."""

    def __init__(self, reactor: Any) -> None:
        """Prepare.

        Args:
            reactor: The running reactor.
        """
        self.reactor = reactor
        self.made: list[RedisStore] = []

    def make(
        self, url: str, store_timeout: float = RELAXED, clock: Clock | None = None, **kw: Any
    ) -> RedisStore:
        """A started store for ``url``, its timers on a fake clock.

        Args:
            url: The Redis URL.
            store_timeout: Seconds each call may take.
            clock: The store's clock (default: a fresh one, never advanced).
            kw: More RedisStore arguments.
        """
        store = RedisStore(url, self.reactor, store_timeout, clock=clock or Clock(), **kw)
        store.startService()
        self.made.append(store)
        return store

    async def close(self) -> None:
        """Stop every store made here."""
        for store in self.made:
            await timeout(store.stopService(), self.reactor)


@pytest_twisted.async_yield_fixture
async def stores(reactor: Any) -> AsyncIterator[Stores]:
    """A factory of started RedisStores, closed after the test."""
    made = Stores(reactor)
    yield made
    await made.close()


def next_turn(reactor: Any) -> Deferred[None]:
    """A Deferred fired on the reactor's next iteration: no time is waited
    for, the reactor only gets to do its I/O."""
    turn: Deferred[None] = Deferred(lambda _: call.cancel())
    call = reactor.callLater(0, turn.callback, None)
    return turn


async def until(reactor: Any, done: Callable[[], object], what: str) -> None:
    """Wait until ``done()`` is true, checking it once a reactor turn (at
    most WAIT s in all).

    Args:
        reactor: The running reactor.
        done: The condition; it may return an awaitable (a question to a
            server), awaited for its answer.
        what: What is waited for, for the message.

    Raises:
        AssertionError: It never came true.
    """

    async def turns() -> None:
        while True:
            answer = done()
            if inspect.isawaitable(answer):
                answer = await answer
            if answer:
                return
            await next_turn(reactor)

    try:
        await timeout(Deferred.fromCoroutine(turns()), reactor)
    except defer.TimeoutError:
        raise AssertionError(f"waited {WAIT} s in vain for {what}") from None


async def connected(store: RedisStore, reactor: Any) -> RedisStore:
    """Wait until ``store`` has a ready connection; return it."""
    await timeout(store.when_connected(), reactor)
    return store


async def retry_scheduled(clock: Clock, reactor: Any) -> None:
    """Wait until a connection attempt has failed: its retry is on ``clock``."""
    await until(reactor, clock.getDelayedCalls, "a connection attempt to fail")


async def store_error(d: Deferred[Any], reactor: Any) -> StoreError:
    """Await ``d`` (bounded) and return the StoreError it fails with."""
    try:
        result = await timeout(d, reactor)
    except StoreError as e:
        return e
    raise AssertionError(f"expected a StoreError, got {result!r}")


async def setup_error(store: RedisStore, clock: Clock, reactor: Any) -> StoreError:
    """The error of a call once the store's first connection has failed.

    Args:
        store: A store whose connection fails (AUTH, SELECT ...).
        clock: Its clock, where its retry is scheduled once it has failed.
        reactor: The running reactor.
    """
    await retry_scheduled(clock, reactor)
    return await store_error(store.budget_used("k", "w"), reactor)


# --- rate limits ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_burst_is_allowed_then_refused_with_a_wait_of_one_interval(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """Three of burst 3 at 50/s pass; the fourth waits at most 1/50 s."""
    store = await connected(stores.make(redis_server.url), reactor)
    for _ in range(3):
        assert await timeout(store.take("client-1", 50, 3), reactor) == 0.0
    wait = await timeout(store.take("client-1", 50, 3), reactor)
    assert isinstance(wait, float)
    assert 0 < wait <= 1 / 50 + 1e-6
    # Another bucket is untouched.
    assert await timeout(store.take("client-2", 50, 3), reactor) == 0.0


@pytest_twisted.ensureDeferred
async def test_a_slow_rate_waits_for_its_whole_interval(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """At one token per 1000 s, the second request waits about 1000 s."""
    store = await connected(stores.make(redis_server.url), reactor)
    assert await timeout(store.take("slow", 0.001, 1), reactor) == 0.0
    wait = await timeout(store.take("slow", 0.001, 1), reactor)
    assert 990 < wait <= 1000


@pytest_twisted.ensureDeferred
async def test_the_bucket_refills_over_time(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """After the wait it was told, a refused client gets a token again."""
    store = await connected(stores.make(redis_server.url), reactor)
    for _ in range(2):
        assert await timeout(store.take("refill", 50, 2), reactor) == 0.0
    wait = await timeout(store.take("refill", 50, 2), reactor)
    assert wait > 0
    # The one wall-clock wait: the bucket refills on redis-server's clock
    # (the script reads TIME), which no fake clock drives. About 20 ms.
    await deferLater(reactor, wait + 0.01, lambda: None)
    assert await timeout(store.take("refill", 50, 2), reactor) == 0.0


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_redis_share_one_bucket(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """What one instance takes, the other cannot take again."""
    first = await connected(stores.make(redis_server.url), reactor)
    second = await connected(stores.make(redis_server.url), reactor)
    rate, burst = 0.01, 3
    assert await timeout(first.take("shared", rate, burst), reactor) == 0.0
    assert await timeout(second.take("shared", rate, burst), reactor) == 0.0
    assert await timeout(first.take("shared", rate, burst), reactor) == 0.0
    assert await timeout(second.take("shared", rate, burst), reactor) > 0
    assert await timeout(first.take("shared", rate, burst), reactor) > 0


@pytest_twisted.ensureDeferred
async def test_rate_limit_keys_expire_once_the_bucket_is_full_again(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """The bucket's key lives as long as the bucket is not full, no longer."""
    store = await connected(stores.make(redis_server.url, prefix="t1:"), reactor)
    assert await timeout(store.take("ttl", 1, 5), reactor) == 0.0
    assert await redis_server.command("EXISTS", "llmproxy:rl:ttl") == 0
    pttl = await redis_server.command("PTTL", "t1:rl:ttl")
    assert 0 < pttl <= 1000
    assert await timeout(store.take("ttl", 1, 5), reactor) == 0.0
    assert 1000 < await redis_server.command("PTTL", "t1:rl:ttl") <= 2000


@pytest_twisted.ensureDeferred
async def test_long_and_odd_names_make_bounded_keys(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """Names over 200 bytes (or looking hashed) are hashed; others used as they are."""
    store = await connected(stores.make(redis_server.url), reactor)
    long_name = "x" * 1000
    assert await timeout(store.take(long_name, 1, 1), reactor) == 0.0
    assert await timeout(store.take(long_name, 1, 1), reactor) > 0
    digest = hashlib.sha256(long_name.encode()).hexdigest()
    assert await redis_server.command("EXISTS", f"llmproxy:rl:sha256:{digest}") == 1
    lookalike = f"sha256:{digest}"
    assert await timeout(store.take(lookalike, 1, 1), reactor) == 0.0, "not the same bucket"
    odd = "ä \r\n\x00\udcff:*"
    assert await timeout(store.take(odd, 1, 1), reactor) == 0.0
    raw = b"llmproxy:rl:" + odd.encode("utf-8", "surrogatepass")
    assert await redis_server.command("EXISTS", raw) == 1
    keys = await redis_server.command("KEYS", "*")
    assert len(keys) == 3 and all(len(k) <= len(b"llmproxy:rl:") + 200 for k in keys)


@pytest_twisted.ensureDeferred
async def test_scripts_flushed_on_the_server_are_sent_again(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """EVALSHA falls back to EVAL when Redis has forgotten the script."""
    store = await connected(stores.make(redis_server.url), reactor)
    assert await timeout(store.take("flush", 1, 2), reactor) == 0.0
    await timeout(store.add_usage("k", "w", 1, reactor.seconds() + 60), reactor)
    assert await redis_server.command("SCRIPT", "FLUSH") == "OK"
    assert await timeout(store.take("flush", 1, 2), reactor) == 0.0
    await timeout(store.add_usage("k", "w", 1, reactor.seconds() + 60), reactor)
    assert await timeout(store.budget_used("k", "w"), reactor) == 2


@pytest_twisted.ensureDeferred
async def test_a_bad_rate_or_burst_is_a_store_error(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """Nonsense arguments fail the call; nothing is sent."""
    store = await connected(stores.make(redis_server.url), reactor)
    for rate, burst in [(0, 1), (-1, 1), (math.inf, 1), (math.nan, 1), (1, 0)]:
        error = await store_error(store.take("b", rate, burst), reactor)
        assert "rate" in str(error) or "burst" in str(error)
    assert await redis_server.command("KEYS", "*") == []


# --- budgets --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_budgets_add_up_and_read_back(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """Usage adds per key and window; an unknown one reads 0."""
    first = await connected(stores.make(redis_server.url), reactor)
    second = await connected(stores.make(redis_server.url), reactor)
    ends = reactor.seconds() + 3600
    assert await timeout(first.budget_used("team-a", "day:2026-12-03"), reactor) == 0
    assert await timeout(first.add_usage("team-a", "day:2026-12-03", 10, ends), reactor) is None
    await timeout(second.add_usage("team-a", "day:2026-12-03", 5, ends), reactor)
    await timeout(second.add_usage("team-a", "day:2026-12-04", 7, ends), reactor)
    assert await timeout(first.budget_used("team-a", "day:2026-12-03"), reactor) == 15
    assert await timeout(second.budget_used("team-a", "day:2026-12-04"), reactor) == 7
    assert await timeout(second.budget_used("team-b", "day:2026-12-03"), reactor) == 0
    assert await redis_server.command("GET", "llmproxy:budget:team-a:day:2026-12-03") == b"15"


@pytest_twisted.ensureDeferred
async def test_a_budget_counter_expires_at_expires_at(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """The counter's expiry is expires_at (rounded up); then it reads 0."""
    store = await connected(stores.make(redis_server.url), reactor)
    later = reactor.seconds() + 86400.25
    await timeout(store.add_usage("team-a", "day:x", 3, later), reactor)
    assert await redis_server.command(
        "EXPIRETIME", "llmproxy:budget:team-a:day:x"
    ) == math.ceil(later)
    seconds, _ = await redis_server.command("TIME")
    soon = int(seconds) + 2
    await timeout(store.add_usage("team-a", "minute:y", 4, soon), reactor)
    assert await timeout(store.budget_used("team-a", "minute:y"), reactor) == 4
    # redis-server expires keys on its own clock, which no fake clock
    # drives: what is checked is the expiry the store set, and that a
    # counter whose time has passed already is gone at once.
    assert await redis_server.command("EXPIRETIME", "llmproxy:budget:team-a:minute:y") == soon
    await timeout(store.add_usage("team-a", "minute:z", 4, soon - 60), reactor)
    assert await timeout(store.budget_used("team-a", "minute:z"), reactor) == 0


@pytest_twisted.ensureDeferred
async def test_values_of_the_wrong_type_are_store_errors(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """Garbage in a key fails that call with StoreError; the next calls work."""
    store = await connected(stores.make(redis_server.url), reactor)
    await redis_server.command("SET", "llmproxy:budget:team-a:day:x", "not-a-number")
    error = await store_error(store.budget_used("team-a", "day:x"), reactor)
    assert str(error).startswith("unexpected reply")
    error = await store_error(store.add_usage("team-a", "day:x", 1, 2e9), reactor)
    assert "not an integer" in str(error)
    await redis_server.command("SET", "llmproxy:budget:team-a:day:y", "1.5")
    error = await store_error(store.budget_used("team-a", "day:y"), reactor)
    assert str(error).startswith("unexpected reply")
    await redis_server.command("RPUSH", "llmproxy:budget:team-b:day:x", "1")
    error = await store_error(store.budget_used("team-b", "day:x"), reactor)
    assert "WRONGTYPE" in str(error)
    await redis_server.command("RPUSH", "llmproxy:rl:listed", "1")
    error = await store_error(store.take("listed", 1, 1), reactor)
    assert "WRONGTYPE" in str(error)
    # Replies still reach the right callers.
    assert await timeout(store.take("fine", 1, 1), reactor) == 0.0
    assert await timeout(store.budget_used("team-c", "day:x"), reactor) == 0


# --- connection ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_down_at_start_fails_fast_then_the_store_connects_by_itself(
    reactor: Any, redis_servers: RedisServers, stores: Stores
) -> None:
    """No Redis: calls fail at once with "not connected"; once it is up, they work."""
    server = await redis_servers.create()
    clock = Clock()
    store = stores.make(server.url, clock=clock)
    for call in [store.take("b", 1, 1), store.budget_used("k", "w"), store.add_usage("k", "w", 1, 2e9)]:
        assert call.called, "failed at once, not after the timeout"
        error = await store_error(call, reactor)
        assert str(error).startswith("not connected")
    for _ in range(3):  # a few connection attempts fail
        await retry_scheduled(clock, reactor)
        clock.advance(ANY_RETRY)
    await retry_scheduled(clock, reactor)
    assert not store.connected
    await server.start()
    clock.advance(ANY_RETRY)
    await connected(store, reactor)
    assert await timeout(store.take("b", 1, 1), reactor) == 0.0


@pytest_twisted.ensureDeferred
async def test_redis_stopped_and_started_again_errors_then_recovers(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """While Redis is away calls fail with StoreError; the same store recovers."""
    clock = Clock()
    store = await connected(stores.make(redis_server.url, clock=clock), reactor)
    assert await timeout(store.take("b", 0.01, 1), reactor) == 0.0
    assert await timeout(store.take("b", 0.01, 1), reactor) > 0
    await redis_server.stop()
    await store_error(store.take("b", 0.01, 1), reactor)
    await until(reactor, lambda: not store.connected, "the store to notice")
    error = await store_error(store.budget_used("k", "w"), reactor)
    assert str(error).startswith("not connected")
    await redis_server.start()  # an empty Redis, on the same port
    clock.advance(ANY_RETRY)
    await connected(store, reactor)
    assert await timeout(store.take("b", 0.01, 1), reactor) == 0.0


@pytest_twisted.ensureDeferred
async def test_a_password_in_the_url_authenticates(
    reactor: Any, redis_servers: RedisServers, stores: Stores
) -> None:
    """``redis://:pw@`` and ``redis://user:pw@`` both work with --requirepass."""
    server = await redis_servers.start(password=PASSWORD)
    plain = await connected(stores.make(server.url), reactor)
    assert await timeout(plain.take("b", 1, 2), reactor) == 0.0
    with_user = f"redis://default:{PASSWORD}@127.0.0.1:{server.port}/0"
    named = await connected(stores.make(with_user), reactor)
    assert await timeout(named.take("b", 1, 2), reactor) == 0.0
    assert await timeout(named.take("b", 1, 2), reactor) > 0


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_a_store_error_that_never_shows_it(
    reactor: Any, redis_servers: RedisServers, stores: Stores
) -> None:
    """A wrong or missing password: StoreError saying why, no password in errors or logs."""
    logged: list[str] = []

    def observe(event: dict) -> None:
        logged.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        server = await redis_servers.start(password=PASSWORD)
        clock = Clock()
        wrong = stores.make(f"redis://:{WRONG_PASSWORD}@127.0.0.1:{server.port}/0", clock=clock)
        error = await setup_error(wrong, clock, reactor)
        assert str(error).startswith("not connected")
        assert any(word in str(error) for word in ("WRONGPASS", "auth"))
        missing = await connected(stores.make(f"redis://127.0.0.1:{server.port}/0"), reactor)
        error2 = await store_error(missing.take("b", 1, 1), reactor)
        assert "NOAUTH" in str(error2)
        other = Clock()
        wrong_user = stores.make(
            f"redis://nobody:{PASSWORD}@127.0.0.1:{server.port}/0", clock=other
        )
        error3 = await setup_error(wrong_user, other, reactor)
        assert any(word in str(error3) for word in ("WRONGPASS", "auth"))
        clock.advance(ANY_RETRY)  # the wrong password is tried again, and fails again
        await retry_scheduled(clock, reactor)
        assert not wrong.connected and not wrong_user.connected
    finally:
        globalLogPublisher.removeObserver(observe)
    for text in [str(error), str(error2), str(error3), *logged]:
        assert PASSWORD not in text and WRONG_PASSWORD not in text, text


@pytest_twisted.ensureDeferred
async def test_the_database_comes_from_the_url(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """``/3`` selects database 3; a database Redis lacks is a StoreError."""
    store = await connected(stores.make(redis_server.url[: -len("/0")] + "/3"), reactor)
    await timeout(store.add_usage("k", "w", 9, reactor.seconds() + 60), reactor)
    assert await redis_server.command("GET", "llmproxy:budget:k:w", db=3) == b"9"
    assert await redis_server.command("GET", "llmproxy:budget:k:w") is None
    clock = Clock()
    missing = stores.make(redis_server.url[: -len("/0")] + "/99", clock=clock)
    error = await setup_error(missing, clock, reactor)
    assert str(error).startswith("not connected")
    assert "dbid" in str(error) or "DB index" in str(error)


@pytest_twisted.ensureDeferred
async def test_stopping_stops_reconnecting_and_fails_later_calls(
    reactor: Any, redis_server: RedisServer
) -> None:
    """After stopService() nothing connects again and calls fail at once."""
    store = RedisStore(redis_server.url, reactor, RELAXED, clock=Clock())
    assert await timeout(store.stopService(), reactor) is None  # never started
    clock = Clock()
    store = RedisStore(redis_server.url, reactor, RELAXED, clock=clock)
    assert verifyObject(IService, store)
    store.startService()
    assert store.running
    await connected(store, reactor)
    await timeout(store.stopService(), reactor)
    await timeout(store.stopService(), reactor)  # twice is fine
    assert not store.connected and not store.running
    call = store.take("b", 1, 1)
    assert call.called
    assert "closed" in str(await store_error(call, reactor))
    assert "closed" in str(await store_error(store.when_connected(), reactor))
    assert clock.getDelayedCalls() == [], "no reconnection, no grace timer left"
    clock.advance(60 * ANY_RETRY)

    async def alone() -> bool:
        # Asked of redis-server: it may see the store's connection close a
        # moment after the store does. Only this question's connection left?
        return (await redis_server.command("CLIENT", "LIST")).count(b"\n") == 1

    await until(reactor, alone, "the store's connection to go")
    down_clock = Clock()
    down = RedisStore("redis://127.0.0.1:1/0", reactor, RELAXED, clock=down_clock)
    down.startService()
    await retry_scheduled(down_clock, reactor)  # between two attempts
    await timeout(down.stopService(), reactor, 2.0)
    assert down_clock.getDelayedCalls() == [], "the next attempt is called off"


@pytest_twisted.ensureDeferred
async def test_a_stopped_store_starts_again(
    reactor: Any, redis_server: RedisServer, stores: Stores
) -> None:
    """As any service, a stopped store may be started again: it reconnects."""
    store = await connected(stores.make(redis_server.url), reactor)
    await timeout(store.stopService(), reactor)
    assert "closed" in str(await store_error(store.take("again", 1, 1), reactor))
    store.startService()
    await connected(store, reactor)
    assert await timeout(store.take("again", 1, 1), reactor) == 0.0


def test_a_wait_for_the_connection_can_be_cancelled(reactor: Any) -> None:
    """Cancelling when_connected() ends that wait only; stopping fails the others."""
    store = RedisStore("redis://127.0.0.1:1/0", reactor, RELAXED, clock=Clock())
    cancelled, other = store.when_connected(), store.when_connected()
    cancelled.cancel()
    failures: list[Failure] = []
    cancelled.addErrback(failures.append)
    other.addErrback(failures.append)
    assert [f.type for f in failures] == [defer.CancelledError]
    store.stopService()
    assert [f.type for f in failures] == [defer.CancelledError, StoreError]


# --- against a fake server ----------------------------------------------------


def parse_command(buffer: bytearray) -> tuple[list[bytes], int] | None:
    """Parse one RESP command (an array of bulk strings) from ``buffer``.

    Returns:
        The arguments and the bytes used, or None when it is incomplete.
    """
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    assert buffer[:1] == b"*", bytes(buffer[:20])
    count, position, args = int(buffer[1:end]), end + 2, []
    for _ in range(count):
        end = buffer.find(b"\r\n", position)
        if end < 0:
            return None
        length = int(buffer[position + 1 : end])
        start = end + 2
        if len(buffer) < start + length + 2:
            return None
        args.append(bytes(buffer[start : start + length]))
        position = start + length + 2
    return args, position


class FakeRedis:
    """A loopback server that reads RESP commands and answers as told.

    Attributes:
        answer: Gives each command's reply (raw RESP), or None to hold it.
        commands: Every command received, in order.
        connections: Every connection made, in order.
        lost: How many connections have closed.
    """

    def __init__(self) -> None:
        """Answer nothing until told otherwise."""
        self.answer: Callable[[list[bytes]], bytes | None] = lambda args: None
        self.commands: list[list[bytes]] = []
        self.connections: list[FakeRedisConnection] = []
        self.lost = 0
        self.url = ""


class FakeRedisConnection(Protocol):
    """One connection to :class:`FakeRedis`."""

    def __init__(self, server: FakeRedis) -> None:
        """Belong to ``server``."""
        self.server = server
        self.buffer = bytearray()

    def connectionMade(self) -> None:
        """Count the connection."""
        self.server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        """Answer every complete command."""
        self.buffer += data
        while (parsed := parse_command(self.buffer)) is not None:
            args, used = parsed
            del self.buffer[:used]
            self.server.commands.append(args)
            reply = self.server.answer(args)
            if reply is not None:
                self.transport.write(reply)

    def connectionLost(self, reason: Failure) -> None:
        """Count the loss."""
        self.server.lost += 1


@pytest_twisted.async_yield_fixture
async def fake_redis(reactor: Any) -> AsyncIterator[FakeRedis]:
    """A FakeRedis on 127.0.0.1, stopped after the test."""
    server = FakeRedis()
    factory = Factory.forProtocol(lambda: FakeRedisConnection(server))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    server.url = f"redis://127.0.0.1:{port.getHost().port}/0"
    yield server
    await port.stopListening()
    for connection in server.connections:
        connection.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_every_call_answers_within_the_timeout(
    reactor: Any, fake_redis: FakeRedis, stores: Stores
) -> None:
    """A server that never answers: each call fails after 50 ms, saying so."""
    clock = Clock()
    store = await connected(stores.make(fake_redis.url, 0.05, clock=clock), reactor)
    calls = [store.take("b", 1, 1), store.budget_used("k", "w"),
             store.add_usage("k", "w", 1, 2e9)]
    await until(reactor, lambda: len(fake_redis.commands) == 3, "the commands")
    clock.advance(0.049)
    assert not any(call.called for call in calls), "no answer before 50 ms"
    clock.advance(0.002)
    assert all(call.called for call in calls), "every call answered at 50 ms"
    errors = [await store_error(call, reactor) for call in calls]
    assert [str(e) for e in errors] == ["timed out after 50 ms"] * 3
    assert len(fake_redis.commands) == 3


@pytest_twisted.ensureDeferred
async def test_a_late_reply_never_reaches_the_next_caller(
    reactor: Any, fake_redis: FakeRedis, stores: Stores
) -> None:
    """The reply to a timed-out command is dropped, not handed to the next call."""
    clock = Clock()
    store = await connected(stores.make(fake_redis.url, 1.0, clock=clock), reactor)
    call = store.budget_used("k", "w")
    await until(reactor, lambda: len(fake_redis.commands) == 1, "the first command")
    clock.advance(1.0)
    first = await store_error(call, reactor)
    assert "timed out" in str(first)
    second = store.budget_used("k", "w")
    await until(reactor, lambda: len(fake_redis.commands) == 2, "the second command")
    fake_redis.connections[-1].transport.write(b"$1\r\n7\r\n$1\r\n9\r\n")
    assert await timeout(second, reactor) == 9


@pytest_twisted.ensureDeferred
async def test_a_connection_that_keeps_timing_out_is_made_again(
    reactor: Any, fake_redis: FakeRedis, stores: Stores
) -> None:
    """Ten timeouts in a row drop the connection; the store reconnects by itself."""
    clock = Clock()
    store = await connected(stores.make(fake_redis.url, 0.3, clock=clock), reactor)
    calls = [store.budget_used("k", "w") for _ in range(10)]
    await until(reactor, lambda: len(fake_redis.commands) == 10, "the commands")
    clock.advance(0.3)
    for call in calls:
        assert "timed out" in str(await store_error(call, reactor))
    await until(reactor, lambda: fake_redis.lost == 1, "the connection to be dropped")
    await retry_scheduled(clock, reactor)
    assert len(fake_redis.connections) == 1
    clock.advance(ANY_RETRY)
    await until(reactor, lambda: len(fake_redis.connections) == 2, "a new connection")
    await connected(store, reactor)
    fake_redis.answer = lambda args: b"$2\r\n12\r\n"
    assert await timeout(store.budget_used("k", "w"), reactor) == 12


@pytest_twisted.ensureDeferred
async def test_commands_waiting_for_redis_are_bounded(
    reactor: Any, fake_redis: FakeRedis, stores: Stores
) -> None:
    """With 1,024 commands unanswered, the next call fails at once."""
    store = await connected(stores.make(fake_redis.url, 30.0), reactor)
    waiting = [store.budget_used("k", "w") for _ in range(1024)]
    assert not any(d.called for d in waiting)
    refused = store.take("b", 1, 1)
    assert refused.called
    assert "1024 commands already waiting" in str(await store_error(refused, reactor))
    await until(reactor, lambda: len(fake_redis.commands) == 1024, "all commands to arrive")
    fake_redis.connections[-1].transport.write(b"$1\r\n5\r\n")  # one answered
    assert await timeout(waiting[0], reactor) == 5
    waiting.append(store.budget_used("k", "w"))  # room for one more
    assert not waiting[-1].called
    await timeout(store.stopService(), reactor)
    outcomes = await timeout(
        gatherResults([d.addErrback(lambda f: f.value) for d in waiting[1:]]), reactor
    )
    assert len(outcomes) == 1024
    assert all(isinstance(o, StoreError) for o in outcomes)


@pytest_twisted.ensureDeferred
async def test_replies_of_the_wrong_type_are_store_errors(
    reactor: Any, fake_redis: FakeRedis, stores: Stores
) -> None:
    """A string from the scripts, a float counter or a Redis error: StoreError."""
    store = await connected(stores.make(fake_redis.url), reactor)
    fake_redis.answer = lambda args: b"$3\r\nabc\r\n"
    for call in [store.take("b", 1, 1), store.budget_used("k", "w"),
                 store.add_usage("k", "w", 1, 2e9)]:
        assert str(await store_error(call, reactor)).startswith("unexpected reply")
    fake_redis.answer = lambda args: b":-5\r\n"
    assert str(await store_error(store.take("b", 1, 1), reactor)).startswith("unexpected reply")
    fake_redis.answer = lambda args: b"*1\r\n:1\r\n"
    assert str(await store_error(store.take("b", 1, 1), reactor)).startswith("unexpected reply")
    fake_redis.answer = lambda args: b"-ERR boom\r\n"
    error = str(await store_error(store.take("b", 1, 1), reactor))
    assert error.startswith("Redis error:") and error.endswith("boom")
    fake_redis.answer = lambda args: b":250000\r\n"
    assert await timeout(store.take("b", 1, 1), reactor) == 0.25


# --- the URL -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://127.0.0.1", ("127.0.0.1", 6379, 0, None, None)),
        ("redis://localhost:6380/2", ("localhost", 6380, 2, None, None)),
        ("REDIS://redis.internal/", ("redis.internal", 6379, 0, None, None)),
        ("redis://:pw@h:1/0", ("h", 1, 0, None, "pw")),
        ("redis://user:pw@h/3", ("h", 6379, 3, "user", "pw")),
        ("redis://:p%40ss@h", ("h", 6379, 0, None, "p@ss")),
        ("redis://:p@ss/w:rd#?@h:7000/1", ("h", 7000, 1, None, "p@ss/w:rd#?")),
        ("redis://[::1]:6379/0", ("::1", 6379, 0, None, None)),
        ("redis://[::1]", ("::1", 6379, 0, None, None)),
    ],
)
def test_parse_redis_url_accepts(url: str, expected: tuple[Any, ...]) -> None:
    """Host, port, db, user and password come out; port 6379 and db 0 by default."""
    assert parse_redis_url(url) == expected


SECRET = "hunter2-Secret"


@pytest.mark.parametrize(
    "url",
    [
        "",
        SECRET,
        f"http://:{SECRET}@h",
        f"rediss://:{SECRET}@h",
        f"redis://{SECRET}@h",
        "redis://:@h",
        f"redis://:{SECRET}@",
        f"redis://:{SECRET}",
        f"redis://:{SECRET}@h:0",
        f"redis://:{SECRET}@h:99999",
        f"redis://:{SECRET}@h:",
        f"redis://:{SECRET}@h:{SECRET}",
        f"redis://:{SECRET}@h/x",
        f"redis://:{SECRET}@h/1/2",
        f"redis://:{SECRET}@h/-1",
        f"redis://:{SECRET}@h?db=1",
        f"redis://:{SECRET}@[::1",
        f"redis://:{SECRET}@[not-ip]:1",
        f"redis://:{SECRET}@[::1]x",
        f"redis://:{SECRET}@h o st",
        f"redis://:{SECRET}@{SECRET}:x",
    ],
)
def test_parse_redis_url_refuses_without_echoing_the_password(url: str) -> None:
    """Malformed URLs raise ValueError; the message never holds the secret."""
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert str(caught.value)
    assert SECRET not in str(caught.value)
    with pytest.raises(ValueError) as caught:
        RedisStore(url, None, 0.05)
    assert SECRET not in str(caught.value)


def test_parse_redis_url_refuses_what_is_not_a_string() -> None:
    """A number or None is not a URL."""
    for value in (None, 6379, b"redis://h"):
        with pytest.raises(ValueError):
            parse_redis_url(value)  # type: ignore[arg-type]
