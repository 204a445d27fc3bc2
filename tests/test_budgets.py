"""Token budgets per client key (in-process store) and their config.

The shared (Redis) store is tested in test_shared_limits.py; here a single
proxy keeps its budgets itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.server import Site

from conftest import timeout
from helpers import fetch, header
from llmproxy.config import ConfigError, parse_config_text
from llmproxy.limits import KeyStore, budget_window
from llmproxy.web import build_admin_resource

CHAT = {"model": "m", "messages": [{"role": "user", "content": "one two three four"}],
        "max_tokens": 6}
# The fake upstream's usage for CHAT: 4 prompt words + its 6-word reply.
TOKENS = 4 + 6


def ask(body: dict[str, Any]) -> int:
    """What a budgeted request for ``body`` holds while it runs: its input
    (bytes / 4, rounded up) and its ``max_tokens``."""
    return -(-len(json.dumps(body)) // 4) + body["max_tokens"]


def budget_config(base: str, tokens: int, extra: str = "") -> str:
    """Two named keys: team-a with a budget, team-b without one."""
    return (
        f'target_map:\n  "/v1/": "{base}"\n'
        "auth:\n  keys:\n"
        f"    - {{key: key-a-secret, name: team-a, budget: {{tokens: {tokens}, per: day}}}}\n"
        "    - {key: key-b-secret, name: team-b}\n" + extra
    )


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}


async def admin_get(reactor: Any, root: Any, client: Any, path: str) -> tuple[Any, bytes]:
    """GET ``path`` from an admin site serving ``root``."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Site(build_admin_resource(root))
    )
    try:
        return await fetch(client, reactor, f"http://127.0.0.1:{port.getHost().port}{path}",
                           method=b"GET")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_spent_budget_refuses_with_insufficient_quota(
    reactor, upstreams, proxies, client, access
) -> None:
    """Streamed and whole answers count; a request the rest of the budget
    cannot cover (what it may cost: its input and ``max_tokens``) gets 429
    with Retry-After."""
    upstream, base = await upstreams.start()
    streamed = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    # Room for the first two (the second holding its ask), not a third.
    proxy = await proxies.start(budget_config(base, tokens=TOKENS + ask(streamed)))
    url = proxy + "/v1/chat/completions"
    response, _ = await fetch(client, reactor, url, CHAT, headers=bearer("key-a-secret"))
    assert response.code == 200
    response, body = await fetch(client, reactor, url, streamed, headers=bearer("key-a-secret"))
    assert response.code == 200 and b"[DONE]" in body
    await timeout(access.wait(2), reactor)
    sent = len(upstream.requests)
    response, body = await fetch(client, reactor, url, streamed, headers=bearer("key-a-secret"))
    assert response.code == 429
    error = json.loads(body)["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    assert "key-a-secret" not in body.decode()
    _, ends = budget_window("day", reactor.seconds())
    retry = int(header(response, "retry-after"))
    assert 0 < retry <= ends - reactor.seconds() + 1
    assert len(upstream.requests) == sent, "refused before anything went upstream"
    # Another key is unaffected.
    response, _ = await fetch(client, reactor, url, CHAT, headers=bearer("key-b-secret"))
    assert response.code == 200
    await timeout(access.wait(4), reactor)
    assert [r.get("key_name") for r in access] == ["team-a"] * 3 + ["team-b"]
    assert all("key-a-secret" not in json.dumps(r, default=str) for r in access)


def _events(body: bytes) -> list[Any]:
    """The data of each event of an OpenAI stream (``[DONE]`` as a string)."""
    events = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            data = line[6:]
            events.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return events


@pytest_twisted.ensureDeferred
async def test_a_budgeted_stream_is_charged_without_stream_options_and_sees_no_usage(
    reactor, upstreams, proxies, client, access
) -> None:
    """A budgeted key streaming without ``stream_options`` is charged what
    the stream used: the proxy asks the upstream for the usage, and takes the
    usage-only event out of what the client gets, which is exactly the
    stream it asked for."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(budget_config(base, tokens=TOKENS * 10))
    url = proxy + "/v1/chat/completions"
    response, body = await fetch(client, reactor, url, {**CHAT, "stream": True},
                                 headers=bearer("key-a-secret"))
    assert response.code == 200
    events = _events(body)
    assert events[-1] == "[DONE]"
    assert all(e == "[DONE]" or e["choices"] for e in events), "no usage-only event"
    assert all(e == "[DONE]" or e.get("usage") is None for e in events)
    sent = json.loads(upstream.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    await timeout(access.wait(1), reactor)
    assert access[0]["total_tokens"] == TOKENS
    root = proxies.roots[-1]
    response, body = await admin_get(reactor, root, client, "/budgets")
    rows = {row["name"]: row for row in json.loads(body)["keys"]}
    assert rows["team-a"]["used"] == TOKENS

    # A client that asked for the usage gets its event, as the upstream sent it.
    asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response, body = await fetch(client, reactor, url, asked, headers=bearer("key-a-secret"))
    usage = [e for e in _events(body) if e != "[DONE]" and not e["choices"]]
    assert len(usage) == 1 and usage[0]["usage"]["total_tokens"] == TOKENS

    # A key without a budget streams untouched (stream_usage: budget).
    response, body = await fetch(client, reactor, url, {**CHAT, "stream": True},
                                 headers=bearer("key-b-secret"))
    assert "stream_options" not in json.loads(upstream.requests[-1].body)


@pytest_twisted.ensureDeferred
async def test_budgets_lists_use_and_budget_per_named_key(
    reactor, upstreams, proxies, client, access
) -> None:
    """GET /budgets on the admin site: use, budget, window, never a key."""
    _, base = await upstreams.start()
    proxy = await proxies.start(budget_config(base, tokens=1000))
    response, _ = await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT,
                              headers=bearer("key-a-secret"))
    assert response.code == 200
    await timeout(access.wait(1), reactor)
    response, body = await admin_get(reactor, proxies.roots[-1], client, "/budgets")
    assert response.code == 200
    assert header(response, "content-type") == "application/json"
    rows = {row["name"]: row for row in json.loads(body)["keys"]}
    assert rows["team-a"]["used"] == TOKENS
    assert rows["team-a"]["remaining"] == 1000 - TOKENS
    assert rows["team-a"]["budget"] == {"tokens": 1000, "per": "day", "reserve": 4096}
    assert rows["team-a"]["unit"] == "tokens" and rows["team-a"]["reserved"] == 0
    assert rows["team-a"]["window"].startswith("day:")
    assert b"secret" not in body


def keys_file_config(path: Path, keys: str = "") -> str:
    """A config whose ``auth`` names ``path`` as its keys file.

    Args:
        path: The keys file.
        keys: ``auth.keys`` entries (YAML flow items), if any.

    Returns:
        The config's text.
    """
    return (f'target_map: {{"/": "http://a"}}\n'
            f'auth: {{keys: [{keys}], keys_file: "{path}"}}\n')


def test_keys_file_lines_carry_names_and_budgets(tmp_path: Path) -> None:
    """``KEY name=N budget=T/per`` lines; mistakes name the file and line,
    never the key nor what follows it."""
    path = tmp_path / "keys"
    path.write_text("# team keys\nk-one name=team-a budget=500/hour\nk-two\nk-three name=ops\n")
    store = KeyStore.from_config(parse_config_text(keys_file_config(path), environ={}).auth)
    one = store.lookup("k-one")
    assert one.name == "team-a" and (one.budget.tokens, one.budget.per) == (500, "hour")
    assert store.lookup("k-two").name is None
    assert [k.name for k in store.named()] == ["team-a", "ops"]
    for line, problem in [
        ("k-secret name=bad/name", "a key name is"),
        ("k-secret budget=500/week", "expected one of minute"),
        ("k-secret budget=500/day", "needs a name"),
        ("k-secret budget=lots", "expected TOKENS/PER"),
        ("k-secret budget=0/day", "at least 1"),
        ("k-secret colour=blue", "expected name=NAME"),
        ("k-secret name=a name=b", "expected name=NAME"),
        ("k-secret secret-part name=a", "expected name=NAME"),
        ("k-secret name=ops\nk-other name=ops", "used by another key"),
    ]:
        path.write_text(line + "\n")
        with pytest.raises(ConfigError) as raised:
            parse_config_text(keys_file_config(path), environ={})
        message = str(raised.value)
        assert raised.value.key == "auth.keys_file"
        assert problem in message and f"{str(path)!r}, line " in message
        for secret in ("k-secret", "secret-part", "bad/name", "week", "lots", "blue"):
            assert secret not in message, message


def test_keys_file_names_are_not_those_of_config_keys(tmp_path: Path) -> None:
    """A name in the keys file that ``auth.keys`` uses already is refused."""
    path = tmp_path / "keys"
    path.write_text("k-file name=team-a\n")
    with pytest.raises(ConfigError) as raised:
        parse_config_text(keys_file_config(path, "{key: k-config, name: team-a}"), environ={})
    assert raised.value.key == "auth.keys_file"
    assert "line 1: its name=NAME is used by another key" in str(raised.value)


@pytest.mark.parametrize(
    "keys, key, problem",
    [
        ('{key: k, name: "team a"}', "auth.keys[0].name", "a key name is"),
        ('{key: k, name: "x\\u0000y"}', "auth.keys[0].name", "a key name is"),
        ("{key: k, name: " + "n" * 65 + "}", "auth.keys[0].name", "a key name is"),
        ("{key: k, budget: {tokens: 5, per: day}}", "auth.keys[0].name", "needs a name"),
        ("{key: k, name: t, budget: {tokens: 0, per: day}}", "auth.keys[0].budget.tokens",
         "at least 1"),
        ("{key: k, name: t, budget: {tokens: 5, per: week}}", "auth.keys[0].budget.per",
         "expected one of"),
        ("{name: t}", "auth.keys[0].key", "required"),
        ("{key: k, name: t, colour: red}", "auth.keys[0].colour", "unknown key"),
    ],
)
def test_key_config_mistakes_name_the_key(keys: str, key: str, problem: str) -> None:
    """Odd names and bad budgets are refused with one line naming the key."""
    text = f'target_map: {{"/": "http://a"}}\nauth:\n  keys: [{keys}]\n'
    with pytest.raises(ConfigError) as raised:
        parse_config_text(text, environ={})
    assert raised.value.key == key
    assert problem in str(raised.value)


def test_two_keys_may_not_share_a_name() -> None:
    """Names identify budgets: each is used once."""
    text = ('target_map: {"/": "http://a"}\nauth:\n  keys: [{key: a, name: t}, '
            "{key: b, name: t}]\n")
    with pytest.raises(ConfigError) as raised:
        parse_config_text(text, environ={})
    assert raised.value.key == "auth.keys[1].name"


@pytest.mark.parametrize(
    "per, now, window, ends",
    [
        ("minute", 1764750605.5, "minute:2025-12-03T08:30", 1764750660.0),
        ("hour", 1764750605.5, "hour:2025-12-03T08", 1764752400.0),
        ("day", 1764750605.5, "day:2025-12-03", 1764806400.0),
        ("month", 1764750605.5, "month:2025-12", 1767225600.0),
        ("month", 1767225599.0, "month:2025-12", 1767225600.0),
        ("month", 1767225600.0, "month:2026-01", 1769904000.0),
    ],
)
def test_budget_windows_are_calendar_windows_in_utc(
    per: str, now: float, window: str, ends: float
) -> None:
    """Windows start on the minute, hour, day or month in UTC."""
    assert budget_window(per, now) == (window, ends)


@pytest_twisted.ensureDeferred
async def test_a_reload_applies_new_budgets_and_keeps_what_was_used(
    reactor, upstreams, proxies, client, access
) -> None:
    """SIGHUP's new root: the changed budget applies, the use so far counts."""
    _, base = await upstreams.start()
    proxy = await proxies.start(budget_config(base, tokens=ask(CHAT)))
    url = proxy + "/v1/chat/completions"
    response, _ = await fetch(client, reactor, url, CHAT, headers=bearer("key-a-secret"))
    assert response.code == 200
    await timeout(access.wait(1), reactor)
    response, _ = await fetch(client, reactor, url, CHAT, headers=bearer("key-a-secret"))
    assert response.code == 429
    bigger = parse_config_text(budget_config(base, tokens=2 * TOKENS + ask(CHAT)),
                               environ={})
    proxies.gateways[-1].reload(bigger)
    codes = []
    for i in range(3):
        response, _ = await fetch(client, reactor, url, CHAT, headers=bearer("key-a-secret"))
        codes.append(response.code)
        await timeout(access.wait(3 + i), reactor)  # its usage is counted
    assert codes == [200, 200, 429], "2 more answers fit the new budget"
