"""Model aliases and fallbacks rewrite the body's ``model``, and nothing else.

The rewrite finds the top-level ``model`` with the same bounded byte scan
the router uses and replaces its value in place: no other byte the client
sent changes (duplicate keys, number spellings, lone surrogates, any
nesting), and no body makes it fail or hold the reactor.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from helpers import fetch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.proxy import with_model
from llmproxy.routing import MAX_CANDIDATES, find_members

KEYS = st.sampled_from(["model", "stream", "a", 'mo"del', "model\\"]) | st.text(max_size=5)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["model", "[{", '"model": "x"', "\\", "}", ""]) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    document=st.dictionaries(KEYS, VALUES, max_size=6),
    key=KEYS,
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_find_members_gives_each_top_level_value_as_json_loads_reads_it(
    document: dict[str, Any], key: str, ensure_ascii: bool, indent: int | None
) -> None:
    """For any JSON object, the bytes found for a member decode to the value
    ``json.loads`` gives that member, and a missing member is not found.

    Args:
        document: A JSON object.
        key: The member looked for.
        ensure_ascii: Whether non-ASCII text is escaped.
        indent: How the JSON is laid out.
    """
    if not (key.isascii() and key.isprintable()) or '"' in key or "\\" in key:
        return  # find_members looks for plain ASCII names only
    body = json.dumps(document, ensure_ascii=ensure_ascii, indent=indent).encode()
    found = find_members(body, (key,))
    if key not in document:
        assert key not in found
        return
    raw = found[key].raw(body)
    assert raw is not None
    assert json.loads(raw) == json.loads(body)[key]


@settings(max_examples=300, deadline=None)
@given(document=st.dictionaries(KEYS, VALUES, max_size=6), model=st.text(max_size=20))
def test_with_model_changes_only_the_models_bytes(document: dict[str, Any], model: str) -> None:
    """The rewritten body is the client's with the model's value swapped:
    the bytes before and after it are the client's own.

    Args:
        document: A JSON object, with a string ``model`` added.
        model: The model written in its place.
    """
    document["model"] = "alias"
    body = json.dumps(document, indent=1).encode()
    rewritten = with_model(body, model)
    start = body.index(b'"model": "alias"') + len(b'"model": ')
    assert rewritten[:start] == body[:start]
    assert rewritten[-(len(body) - start - len(b'"alias"')):] == body[start + len(b'"alias"'):]
    assert json.loads(rewritten) == {**json.loads(body), "model": model}


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "alias", "n": 1.0e2, "x": -0.0, "big": 123456789012345678901234567890}',
        b'{"a": 1, "a": 2, "model": "alias", "a": 3}',
        b'{"model": "alias", "text": "\\ud800 lone", "raw": "\xed\xa0\x80"}',
        b'{"model": "alias", "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b'{"deep": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1000 + b', "model": "alias"}',
        b'{ "model" :\n\t"alias" ,"k":"v"}',
    ],
    ids=["numbers", "duplicate-keys", "lone-surrogate", "deep-array", "deep-object", "spacing"],
)
def test_with_model_keeps_what_json_would_change(body: bytes) -> None:
    """Bodies that ``json.loads`` + ``json.dumps`` would rewrite or refuse
    (number spellings, duplicate keys, a lone surrogate, nesting 1,000 deep)
    get only their model changed.

    Args:
        body: A request body naming the alias.
    """
    rewritten = with_model(body, "real-model")
    assert rewritten == body.replace(b'"alias"', b'"real-model"', 1)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b'["model", "alias"]',
        b'{"messages": [{"model": "alias"}]}',
        b'{"model": 4}',
        b'{"model": "alias"' + b', "m": 1' * 0 + b', "model": {"x": 1}}',
        b'{"x": [' + b'{"model": 1},' * (MAX_CANDIDATES + 1) + b'{}], "model": "alias"}',
    ],
    ids=["not-json", "empty", "array", "nested-only", "not-a-string", "last-not-a-string",
         "too-many-candidates"],
)
def test_with_model_leaves_a_body_without_a_top_level_string_model(body: bytes) -> None:
    """A body with no top-level string ``model`` (as the router read it) is
    sent unchanged.

    Args:
        body: A request body.
    """
    assert with_model(body, "real-model") == body


CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest_twisted.ensureDeferred
async def test_an_alias_rewrites_only_the_model_through_the_daemon(
    reactor: Any, upstreams: Any, proxies: Any, client: Any
) -> None:
    """Through the running proxy, an alias reaches its model's upstream with
    exactly the client's bytes but the model's; a deeply nested body and one
    with a lone surrogate are forwarded, never a 500."""
    upstream, base = await upstreams.start()
    proxy = await proxies.start(
        f'target_map:\n  /v1/: "{base}"\n'
        f'model_routes:\n  "real-model": "{base}/echo"\n'
        'model_aliases: {"alias": "real-model"}\n'
    )
    url = proxy + "/v1/chat/completions"
    bodies = [
        b'{"model": "alias", "n": 1.0e2, "n": 3, "messages": []}',
        b'{"model": "alias", "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b'{"model": "alias", "text": "\\ud800"}',
    ]
    for body in bodies:
        response, _ = await fetch(client, reactor, url, body,
                                  headers={"Content-Type": "application/json"})
        assert response.code == 200
        assert upstream.requests[-1].body == body.replace(b'"alias"', b'"real-model"', 1)


class _Consumer:
    """A consumer whose buffer fills: it pauses its producer past a size."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = bytearray()
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.data += data
        if len(self.data) >= self.room:
            self.producer.pauseProducing()

    def drain(self) -> None:
        """Take what was written; let the producer go on."""
        self.room = len(self.data) + 256 * 1024
        self.producer.resumeProducing()


def test_a_large_rewritten_body_is_written_as_the_connection_takes_it() -> None:
    """A 2 MiB body with its model replaced is written in chunks, pausing
    when the connection's buffer is full, never copied whole; what arrives is
    the client's body with only the model changed, and it can be written
    again from the start (a resend)."""
    from llmproxy.proxy import Body

    raw = b'{"messages": [' + b"{}, " * (512 * 1024) + b'{}], "model": "alias"}'
    body = Body(raw)
    body.set_model("real-model")
    producer = body.producer()
    expected = raw.replace(b'"alias"', b'"real-model"')
    assert producer is not None and producer.length == len(expected)
    for _ in range(2):  # a resend writes it all again
        consumer = _Consumer(room=256 * 1024)
        consumer.registerProducer(producer, True)
        done = producer.startProducing(consumer)
        rounds = 0
        while not done.called:
            assert len(consumer.data) < consumer.room + 64 * 1024, "paused when full"
            consumer.drain()
            rounds += 1
        assert rounds > 4
        assert bytes(consumer.data) == expected


def test_a_stopped_body_writes_nothing_more_and_never_finishes() -> None:
    """A request given up mid-body: the producer stops writing and its
    Deferred never fires (IBodyProducer's contract)."""
    from llmproxy.proxy import Body

    raw = b'{"model": "alias", "pad": "' + b"x" * (1024 * 1024) + b'"}'
    body = Body(raw)
    body.set_model("real-model")
    producer = body.producer()
    assert producer is not None
    consumer = _Consumer(room=128 * 1024)
    consumer.registerProducer(producer, True)
    done = producer.startProducing(consumer)
    written = len(consumer.data)
    producer.stopProducing()
    producer.resumeProducing()
    assert len(consumer.data) == written
    assert not done.called
