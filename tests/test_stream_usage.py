"""Asking an OpenAI stream for its usage on the client's behalf.

``stream_usage`` makes the proxy add ``stream_options.include_usage`` to a
streamed chat or completions request (every other byte kept), and take the
usage-only event out of what the client gets, so that the client sees the
stream it asked for while its key is charged what the stream used.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.proxy import Body
from llmproxy.proxy._usage_event import UsageEventFilter, ask_stream_usage

CHAT_PATH = b"/v1/chat/completions"


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"model":"m","stream":true,"messages":[]}',
         {"model": "m", "stream": True, "messages": [], "stream_options": {"include_usage": True}}),
        (b'{"stream":true,"stream_options":{"include_usage":false}}',
         {"stream": True, "stream_options": {"include_usage": True}}),
        (b'{"stream":true,"stream_options":{}}',
         {"stream": True, "stream_options": {"include_usage": True}}),
        (b'{"stream":true,"stream_options":{"x":1}}',
         {"stream": True, "stream_options": {"include_usage": True, "x": 1}}),
        (b'{"stream":true,"stream_options":null}',
         {"stream": True, "stream_options": {"include_usage": True}}),
        (b' \n {"stream" : true}',
         {"stream": True, "stream_options": {"include_usage": True}}),
    ],
    ids=["absent", "false", "empty", "other-options", "null", "spaced"],
)
def test_a_stream_is_asked_for_its_usage(body: bytes, expected: dict[str, object]) -> None:
    """``include_usage`` is added, wherever the client's options left it out.

    Args:
        body: A streamed chat request.
        expected: What the upstream is sent.
    """
    request = Body(body)
    assert ask_stream_usage(request, CHAT_PATH, "budget", budgeted=True)
    assert json.loads(bytes(request)) == expected


@pytest.mark.parametrize(
    "body, path, mode, budgeted",
    [
        (b'{"stream":true,"stream_options":{"include_usage":true}}', CHAT_PATH, "always", True),
        (b'{"stream":false}', CHAT_PATH, "always", True),
        (b'{"messages":[]}', CHAT_PATH, "always", True),
        (b'{"stream":true}', b"/v1/responses", "always", True),
        (b'{"stream":true}', b"/v1/messages", "always", True),
        (b'{"stream":true}', CHAT_PATH, "never", True),
        (b'{"stream":true}', CHAT_PATH, "budget", False),
        (b"not json", CHAT_PATH, "always", True),
        (b'["stream", true]', CHAT_PATH, "always", True),
    ],
    ids=["client-asked", "not-streamed", "no-stream", "responses-api", "anthropic", "never",
         "no-budget", "not-json", "array"],
)
def test_a_body_is_left_as_it_is_when_not_to_ask(
    body: bytes, path: bytes, mode: str, budgeted: bool
) -> None:
    """Nothing is added when the client asked already, the request does not
    stream, the API reports usage by itself, the mode says no, or the body
    is not a JSON object.

    Args:
        body: The request body.
        path: The routed path.
        mode: ``stream_usage``.
        budgeted: Whether the key has a budget.
    """
    request = Body(body)
    assert not ask_stream_usage(request, path, mode, budgeted)
    assert bytes(request) == body


def _event(data: object) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


STREAM = [
    _event({"choices": [{"delta": {"content": "Hi"}}]}),
    _event({"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": None}),
    _event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
    b"data: [DONE]\n\n",
]


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(b"".join(STREAM))), max_size=12),
       eol=st.sampled_from([b"\n", b"\r\n"]))
def test_the_usage_event_is_taken_out_however_the_stream_is_cut(cuts: list[int], eol: bytes) -> None:
    """However the stream arrives in pieces, the client gets every event but
    the usage-only one, byte for byte.

    Args:
        cuts: Where the upstream's chunks end.
        eol: The stream's line ending.
    """
    events = [e.replace(b"\n", eol) for e in STREAM]
    whole = b"".join(events)
    received: list[bytes] = []
    stream = UsageEventFilter(received.append)
    at = 0
    for cut in sorted(cuts) + [len(whole)]:
        stream.feed(whole[at:cut])
        at = cut
    stream.finish()
    assert b"".join(received) == events[0] + events[1] + events[3]


def test_whole_events_go_on_at_once() -> None:
    """An event is passed on as soon as its blank line arrives: only an
    unfinished one waits."""
    received: list[bytes] = []
    stream = UsageEventFilter(received.append)
    stream.feed(STREAM[0] + STREAM[1][:10])
    assert received == [STREAM[0]]
    stream.feed(STREAM[1][10:])
    assert received == [STREAM[0], STREAM[1]]
