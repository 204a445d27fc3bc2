"""Tests for :mod:`llmproxy.proxy._usage`: token usage read from bodies."""

from __future__ import annotations

import gzip
import zlib
import itertools
import json
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmproxy.proxy import Usage, UsageReader

SSE = b"text/event-stream"
JSON = b"application/json"

OPENAI_CHAT = json.dumps(
    {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": 'Here is {"usage": {"prompt_tokens": 999}} as text }',
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 10,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_3f58d112f7",
    },
    indent=2,
).encode()

OPENAI_EMBEDDINGS = json.dumps(
    {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": 0,
                "embedding": [0.0023064255, -0.009327292, 0.015797347],
            }
        ],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
).encode()

ANTHROPIC_MESSAGE = json.dumps(
    {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": [{"type": "text", "text": "Hi! My name is Claude."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 2095,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 5,
            "output_tokens": 503,
            "service_tier": "standard",
        },
    }
).encode()


def _sse(*events: object, eol: bytes = b"\n") -> bytes:
    """Build an OpenAI-style event stream of ``data:`` lines.

    Args:
        *events: JSON values, or raw bytes used as the data as they are.
        eol: The line ending.

    Returns:
        The stream.
    """
    out = []
    for event in events:
        data = event if isinstance(event, bytes) else json.dumps(event).encode()
        out.append(b"data: " + data + eol + eol)
    return b"".join(out)


def _chat_chunk(
    content: str | None, usage: object = None, *, choices: bool = True
) -> dict:
    """Build one OpenAI chat.completion.chunk.

    Args:
        content: The delta content.
        usage: The chunk's ``usage`` value.
        choices: Whether the chunk has a choice (the usage chunk has none).

    Returns:
        The chunk.
    """
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
        if choices
        else [],
        "usage": usage,
    }


OPENAI_STREAM = _sse(
    _chat_chunk(""),
    _chat_chunk("The word usage"),
    _chat_chunk(' is {"usage": 1}'),
    _chat_chunk(None, None),
    _chat_chunk(
        None,
        {
            "prompt_tokens": 17,
            "completion_tokens": 27,
            "total_tokens": 44,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
        choices=False,
    ),
    b"[DONE]",
)

ANTHROPIC_STREAM = b"".join(
    b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"
    for name, data in [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-sonnet-4-20250514",
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 25,
                        "cache_creation_input_tokens": 3,
                        "cache_read_input_tokens": 2,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "usage?"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 15},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
)


def _read(
    body: bytes,
    content_type: bytes | None = JSON,
    content_encoding: bytes | None = None,
    *,
    cuts: Iterable[int] = (),
    **kwargs: int,
) -> Usage:
    """Feed ``body`` split at ``cuts`` to a new reader and finish it.

    Args:
        body: The whole body.
        content_type: The Content-Type.
        content_encoding: The Content-Encoding.
        cuts: Offsets to split the body at (any order, duplicates allowed).
        **kwargs: ``max_line`` / ``tail_bytes`` for the reader.

    Returns:
        The token counts found (prompt, completion, total).
    """
    reader = UsageReader(content_type, content_encoding, **kwargs)
    for chunk in _split(body, cuts):
        reader.feed(chunk)
    return _counts(reader.finish())


def _counts(usage: Usage) -> Usage:
    """``usage``'s prompt, completion and total counts alone."""
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


def _split(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Split ``body`` at the given offsets.

    Args:
        body: The bytes.
        cuts: Offsets, clamped to the body.

    Returns:
        The chunks, in order (some may be empty).
    """
    points = sorted(min(max(cut, 0), len(body)) for cut in cuts)
    bounds = [0, *points, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def _bytewise(body: bytes) -> Sequence[int]:
    """Cut points that split ``body`` into single bytes.

    Args:
        body: The bytes.

    Returns:
        Every offset.
    """
    return range(1, len(body))


# -- JSON bodies ---------------------------------------------------------------


def test_openai_chat_json() -> None:
    """OpenAI chat usage with nested details; braces in content don't fool it."""
    assert _read(OPENAI_CHAT) == Usage(19, 10, 29)


def test_openai_embeddings_json() -> None:
    """Embeddings report prompt and total tokens only."""
    assert _read(OPENAI_EMBEDDINGS) == Usage(8, None, 8)


def test_anthropic_message_json() -> None:
    """Anthropic input and cache tokens make the prompt; total is the sum."""
    assert _read(ANTHROPIC_MESSAGE) == Usage(2200, 503, 2703)


def test_openai_responses_json() -> None:
    """The Responses API's input/output/total names are read too."""
    body = json.dumps(
        {
            "object": "response",
            "output": [
                {"type": "message", "content": [{"type": "output_text", "text": "hi"}]}
            ],
            "usage": {
                "input_tokens": 36,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 87,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 123,
            },
        }
    ).encode()
    assert _read(body) == Usage(36, 87, 123)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        b"",
        b"application/json",
        b"Application/JSON; charset=utf-8",
        b"application/vnd.api+json",
    ],
)
def test_json_content_types(content_type: bytes | None) -> None:
    """JSON, any +json type and a missing content type are read as JSON."""
    assert _read(OPENAI_EMBEDDINGS, content_type) == Usage(8, None, 8)


def test_json_whitespace_and_escapes() -> None:
    """Whitespace around the colon, escaped quotes and braces in strings."""
    body = b'{"a": "x\\"}{", "usage"  :\n\t{ "note": "\\\\\\"}", "prompt_tokens": 3, "d": {"e": {}}, "completion_tokens": 4 } }'
    assert _read(body) == Usage(3, 4, 7)


def test_json_uses_the_last_usage() -> None:
    """With several usage objects, the last one counts."""
    body = b'{"first": {"usage": {"prompt_tokens": 1}}, "usage": {"prompt_tokens": 2, "total_tokens": 2}}'
    assert _read(body) == Usage(2, None, 2)


def test_json_falls_back_past_a_broken_last_usage() -> None:
    """A last usage object that does not decode does not hide an earlier one."""
    body = b'{"usage": {"prompt_tokens": 5, "total_tokens": 5}, "x": {"usage": {"a": 1,,}}}'
    assert _read(body) == Usage(5, None, 5)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json at all",
        b'{"usage": null}',
        b'{"usage": {"prompt_tokens": 1',
        b'{"error": {"message": "bad", "type": "invalid_request_error"}}',
        b'{"usage": {"prompt_tokens": "1", "completion_tokens": true, "total_tokens": -3}}',
        b'{"usage": {"prompt_tokens": 1.5, "completion_tokens": null, "total_tokens": [1]}}',
        b'{"usage": {"prompt_tokens": 1e999}}',
        b'{"usage": {"prompt_tokens": ' + b"9" * 5000 + b"}}",
        b'{"usage": {"x": ' + b"[" * 20000 + b"]" * 20000 + b"}}",
        b'{"usage": {"\xff\xfe": 1}}',
    ],
)
def test_json_without_usable_usage(body: bytes) -> None:
    """Bodies without a usable usage yield an empty Usage and never raise."""
    assert _read(body) == Usage()


def test_values_are_validated() -> None:
    """Integral floats count; bools, strings, negatives and fractions don't."""
    body = b'{"usage": {"prompt_tokens": 12.0, "completion_tokens": false, "total_tokens": "12"}}'
    assert _read(body) == Usage(12, None, None)
    body = b'{"usage": {"input_tokens": 4, "cache_read_input_tokens": -1, "output_tokens": 2.5}}'
    assert _read(body) == Usage(4, None, None)


def test_absurd_counts_are_refused() -> None:
    """Counts past 2**53 (not exact as floats, which the metrics add up) are
    not counts: a 400-digit one would otherwise break every /metrics scrape."""
    big = b"1" + b"0" * 400
    body = b'{"usage": {"prompt_tokens": %d, "completion_tokens": %d, "total_tokens": %s}}' % (
        2**53, 2**53 + 1, big)
    assert _read(body) == Usage(2**53, None, None)
    assert _read(b"data: " + body + b"\n\n", SSE) == Usage(2**53, None, None)


def test_bom_counts_only_at_the_start_of_a_stream() -> None:
    """A BOM is stripped from the stream's first line only, also when that
    first line is too long to read, however the stream is cut."""
    usage = b'data: {"usage": {"prompt_tokens": 3}}\n\n'
    assert _read(b"\xef\xbb\xbf" + usage, SSE) == Usage(3, None, None)
    stream = b"data: " + b"x" * 100 + b"\n\xef\xbb\xbf" + usage
    for cuts in ((), (107,), (108,), _bytewise(stream)):
        assert _read(stream, SSE, cuts=cuts, max_line=60) == Usage()


def test_huge_json_body_is_read_in_bounded_memory() -> None:
    """A several-MB body: the usage at its end is found, the buffer stays bounded."""
    text = "lorem ipsum {usage} " * 250_000  # 5 MB
    body = json.dumps(
        {
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}}
            ],
            "usage": {
                "prompt_tokens": 1000,
                "completion_tokens": 1250000,
                "total_tokens": 1251000,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        }
    ).encode()
    assert len(body) > 4_000_000
    tail_bytes = 64 * 1024
    reader = UsageReader(JSON, tail_bytes=tail_bytes)
    sizes = itertools.cycle([16 * 1024, 100 * 1024, 3, tail_bytes + 1, 1500])
    offset = largest = 0
    while offset < len(body):
        chunk = body[offset : offset + next(sizes)]
        offset += len(chunk)
        largest = max(largest, len(chunk))
        reader.feed(chunk)
        assert reader.buffered <= tail_bytes + largest
        assert reader.buffered <= tail_bytes
    assert _counts(reader.finish()) == Usage(1000, 1250000, 1251000)


def test_huge_json_body_in_one_chunk() -> None:
    """A single chunk larger than the tail is cut down at once."""
    body = (
        b'{"pad": "'
        + b"x" * 500_000
        + b'", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    )
    reader = UsageReader(None, tail_bytes=1024)
    reader.feed(body)
    assert reader.buffered == 1024
    assert _counts(reader.finish()) == Usage(1, 2, 3)


def test_usage_cut_off_by_the_tail_is_not_found() -> None:
    """A usage object that starts before the kept tail is not guessed at."""
    body = b'{"usage": {"prompt_tokens": 1, "pad": "' + b"x" * 200 + b'"}}'
    assert _read(body, tail_bytes=100) == Usage()


# -- event streams -------------------------------------------------------------


def test_openai_stream_with_include_usage() -> None:
    """The include_usage chunk is read; ``usage: null`` chunks and [DONE] are not."""
    assert _read(OPENAI_STREAM, SSE) == Usage(17, 27, 44)


def test_anthropic_stream() -> None:
    """message_start gives the prompt (with cache), message_delta the completion."""
    assert _read(ANTHROPIC_STREAM, SSE) == Usage(30, 15, 45)


def test_anthropic_delta_with_input_tokens() -> None:
    """A message_delta carrying input tokens updates the prompt."""
    stream = ANTHROPIC_STREAM.replace(
        b'"usage": {"output_tokens": 15}',
        b'"usage": {"input_tokens": 40, "output_tokens": 15}',
    )
    assert _read(stream, SSE) == Usage(45, 15, 60)


def test_openai_responses_stream() -> None:
    """The Responses API's response.completed event carries the usage."""
    stream = _sse(
        {"type": "response.output_text.delta", "delta": "usage"},
        {
            "type": "response.completed",
            "response": {
                "usage": {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11}
            },
        },
    )
    assert _read(stream, SSE) == Usage(5, 6, 11)


def test_stream_without_usage() -> None:
    """A stream that never reports usage yields an empty Usage."""
    stream = _sse(_chat_chunk("hi"), _chat_chunk("usage is null here"), b"[DONE]")
    assert _read(stream, SSE) == Usage()
    assert _read(stream, SSE, cuts=_bytewise(stream)) == Usage()


@pytest.mark.parametrize("eol", [b"\r\n", b"\r", b"\n"])
def test_stream_line_endings(eol: bytes) -> None:
    """CRLF, CR and LF line endings, whole or split a byte at a time."""
    stream = OPENAI_STREAM.replace(b"\n", eol)
    assert _read(stream, SSE) == Usage(17, 27, 44)
    assert _read(stream, SSE, cuts=_bytewise(stream)) == Usage(17, 27, 44)
    anthropic = ANTHROPIC_STREAM.replace(b"\n", eol)
    assert _read(anthropic, SSE, cuts=_bytewise(anthropic)) == Usage(30, 15, 45)


def test_stream_details() -> None:
    """Media type case and parameters, a BOM, ``data:`` without a space, no final newline."""
    stream = b'\xef\xbb\xbfdata:{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    assert _read(stream, b"Text/Event-Stream; charset=utf-8") == Usage(1, 2, 3)
    assert _read(stream, SSE, cuts=_bytewise(stream)) == Usage(1, 2, 3)


@pytest.mark.parametrize(
    "line",
    [
        b"data: [DONE]",
        b"data: usage",
        b'data: {"usage": ',
        b"data: \xff\xfeusage",
        b'data: ["usage"]',
        b'data: {"usage": {"prompt_tokens": ' + b"9" * 5000 + b"}}",
        b'data: {"usage": ' + b"[" * 50000 + b"}",
        b': comment with usage {"usage": {"prompt_tokens": 1}}',
        b'event: {"usage": {"prompt_tokens": 1}}',
        b'data {"usage": {"prompt_tokens": 1}}',
    ],
)
def test_stream_lines_ignored(line: bytes) -> None:
    """Non-JSON, non-data and unusable lines are ignored without error."""
    assert _read(line + b"\n\n" + _sse(_chat_chunk("x")), SSE) == Usage()


def test_long_line_is_dropped() -> None:
    """A line longer than max_line is skipped; the lines around it still count."""
    good = _sse(
        _chat_chunk(
            None,
            {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            choices=False,
        )
    )
    long = (
        b'data: {"usage": {"prompt_tokens": 999, "completion_tokens": 999}, "pad": "'
        + b"x" * 1000
        + b'"}\n\n'
    )
    for stream in (
        long + good,
        good + long + b"data: [DONE]\n\n",
        good + long.rstrip(b"\n"),
    ):
        for cuts in ((), _bytewise(stream), range(7, len(stream), 97)):
            reader = UsageReader(SSE, max_line=400)
            for chunk in _split(stream, cuts):
                reader.feed(chunk)
                assert reader.buffered <= 400
            assert _counts(reader.finish()) == Usage(1, 2, 3)


def test_line_of_exactly_max_line_is_kept() -> None:
    """The limit counts the line without its ending, inclusively."""
    line = b'data: {"usage": {"prompt_tokens": 7}}'
    assert _read(line + b"\r\n", SSE, max_line=len(line)) == Usage(7, None, None)
    assert _read(
        line + b"\r\n", SSE, cuts=_bytewise(line), max_line=len(line)
    ) == Usage(7, None, None)
    assert _read(line + b"\r\n", SSE, max_line=len(line) - 1) == Usage()


# -- bodies that are not read ------------------------------------------------


def test_unknown_encodings_are_not_read() -> None:
    """A body in an encoding other than gzip or deflate is not read."""
    assert _read(OPENAI_STREAM, SSE, b"br") == Usage()
    assert _read(OPENAI_CHAT, JSON, b"zstd") == Usage()
    assert _read(OPENAI_CHAT, JSON, b"Identity") == Usage(19, 10, 29)


@pytest.mark.parametrize(
    "encoding, compress",
    [
        (b"gzip", gzip.compress),
        (b"x-gzip", gzip.compress),
        (b"deflate", zlib.compress),
        (b"deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate
    ],
    ids=["gzip", "x-gzip", "deflate", "raw-deflate"],
)
def test_compressed_bodies_are_read_inflated_on_the_side(encoding: bytes, compress: Any) -> None:
    """gzip and deflate bodies, JSON or event stream, fed in any pieces, give
    the usage the plain body gives.

    Args:
        encoding: The Content-Encoding.
        compress: How the upstream compressed the body.
    """
    for body, content_type, counts in (
        (OPENAI_CHAT, JSON, Usage(19, 10, 29)),
        (OPENAI_STREAM, SSE, Usage(17, 27, 44)),
    ):
        packed = compress(body)
        assert _read(packed, content_type, encoding) == counts
        assert _read(packed, content_type, encoding, cuts=_bytewise(packed)) == counts


def test_a_compression_bomb_is_not_read_past_its_bound() -> None:
    """A body inflating past the bound is given up (no usage), in bounded
    memory, without inflating it all."""
    from llmproxy.proxy import _usage

    bomb = gzip.compress(b"{" + b" " * (_usage.MAX_INFLATED + 1024) + b'"usage": {}}')
    reader = UsageReader(JSON, b"gzip")
    for at in range(0, len(bomb), 65536):
        reader.feed(bomb[at:at + 65536])
        assert reader.buffered <= 64 * 1024
    assert reader.finish() == Usage()


def test_the_cached_input_and_the_model_the_upstream_names_are_read() -> None:
    """OpenAI's cached prompt tokens (chat and Responses), Anthropic's cache
    reads, and the model the upstream names in the body or the usage
    event."""
    chat = json.dumps({
        "id": "c", "object": "chat.completion", "model": "gpt-4o-2024-08-06", "choices": [],
        "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                  "prompt_tokens_details": {"cached_tokens": 64}},
    }).encode()
    reader = UsageReader(JSON)
    reader.feed(chat)
    usage = reader.finish()
    assert (usage.cached_tokens, usage.model) == (64, "gpt-4o-2024-08-06")
    reader = UsageReader(SSE)
    reader.feed(ANTHROPIC_STREAM)
    usage = reader.finish()
    assert usage.model is not None and usage.model.startswith("claude")
    assert usage.cached_tokens is not None


def test_generated_text_is_counted_when_asked() -> None:
    """With count_text, the characters of an event stream's text deltas
    (OpenAI content, Anthropic text) are counted; usage lines are not."""
    reader = UsageReader(SSE, count_text=True)
    for piece in (b"Hel", b"lo, ", b"world"):
        reader.feed(_sse(_chat_chunk(piece.decode())))
    assert reader.text_chars == len("Hello, world")
    assert UsageReader(SSE).text_chars == 0


def test_a_responses_stream_counts_its_text_once() -> None:
    """A Responses API stream's text is counted from its delta events only:
    the done events and response.completed, which repeat it, add nothing."""
    text = "Hello, world"
    item = {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": text}]}
    events = [
        ("response.created", {"response": {"output": [], "text": {"format": {}}}}),
        *[("response.output_text.delta", {"delta": piece}) for piece in ("Hel", "lo, ", "world")],
        ("response.output_text.done", {"text": text}),
        ("response.content_part.done", {"part": item["content"][0]}),
        ("response.output_item.done", {"item": item}),
        ("response.completed", {"response": {"output": [item], "usage": {
            "input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}}),
    ]
    reader = UsageReader(SSE, count_text=True)
    for name, data in events:
        reader.feed(b"event: %s\ndata: %s\n\n" % (
            name.encode(), json.dumps({"type": name, **data}).encode()))
    assert reader.text_chars == len(text)
    assert _counts(reader.finish()) == Usage(3, 4, 7)


@pytest.mark.parametrize(
    "content_type",
    [b"audio/mpeg", b"application/octet-stream", b"text/plain", b"text/event-streamx"],
)
def test_other_content_types_are_ignored(content_type: bytes) -> None:
    """Other media types are not read, whatever they contain."""
    reader = UsageReader(content_type)
    reader.feed(OPENAI_CHAT)
    assert reader.buffered == 0
    assert _counts(reader.finish()) == Usage()


def test_finish_is_final() -> None:
    """finish() may be called again; chunks after it are ignored."""
    reader = UsageReader(JSON)
    reader.feed(OPENAI_EMBEDDINGS)
    assert _counts(reader.finish()) == Usage(8, None, 8)
    reader.feed(ANTHROPIC_MESSAGE)
    assert _counts(reader.finish()) == Usage(8, None, 8)
    assert reader.buffered == 0


@pytest.mark.parametrize("kwargs", [{"max_line": 0}, {"tail_bytes": 0}])
def test_bad_limits(kwargs: dict[str, int]) -> None:
    """Limits must be positive."""
    with pytest.raises(ValueError):
        UsageReader(JSON, **kwargs)


# -- properties ----------------------------------------------------------------

_CUTS = st.lists(st.integers(min_value=0, max_value=4000), max_size=40)

#: Pieces that make event streams interesting: line ends, fields, usage JSON.
_SSE_PIECES = st.sampled_from(
    [
        b"\n",
        b"\r",
        b"\r\n",
        b"data: ",
        b"data:",
        b"event: message_delta",
        b"usage",
        b"[DONE]",
        b"\xef\xbb\xbf",
        b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}',
        b'{"usage": {"output_tokens": 9}}',
        b'{"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}}',
        b'{"usage": null}',
        b"x" * 40,
    ]
)
_SSE_STREAMS = st.lists(_SSE_PIECES | st.binary(max_size=8), max_size=30).map(b"".join)


#: Real bodies with their content types, for the split property.
_BODIES = [
    (OPENAI_STREAM, SSE),
    (OPENAI_STREAM.replace(b"\n", b"\r\n"), SSE),
    (ANTHROPIC_STREAM.replace(b"\n", b"\r"), SSE),
    (OPENAI_CHAT, JSON),
    (ANTHROPIC_MESSAGE, None),
]


# Hypothesis's @given is not combined with @pytest.mark.parametrize here:
# pytest-twisted's wrapper breaks on that pairing, so the body is drawn instead.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(_BODIES), cuts=_CUTS)
def test_any_split_gives_the_same_usage(
    case: tuple[bytes, bytes | None], cuts: list[int]
) -> None:
    """However a real body is split into chunks, the usage is the same."""
    body, content_type = case
    assert _read(body, content_type, cuts=cuts) == _read(body, content_type)
    assert _read(body, content_type, cuts=cuts, tail_bytes=300, max_line=150) == _read(
        body, content_type, tail_bytes=300, max_line=150
    )


@settings(max_examples=300, deadline=None)
@given(
    stream=_SSE_STREAMS,
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=20),
)
def test_any_split_of_any_stream_gives_the_same_usage(
    stream: bytes, cuts: list[int]
) -> None:
    """Split invariance holds for arbitrary event streams, line limit included."""
    for max_line in (1 << 20, 48):
        assert _read(stream, SSE, cuts=cuts, max_line=max_line) == _read(
            stream, SSE, max_line=max_line
        )


@settings(max_examples=150, deadline=None)
@given(
    content_type=st.sampled_from([SSE, JSON, None, b"text/plain"]),
    data=st.lists(st.binary(max_size=64) | _SSE_PIECES, max_size=20),
)
def test_arbitrary_bytes_never_raise(
    content_type: bytes | None, data: list[bytes]
) -> None:
    """Feeding arbitrary bytes never raises and always yields a valid Usage."""
    reader = UsageReader(content_type, max_line=64, tail_bytes=128)
    for chunk in data:
        reader.feed(chunk)
        assert reader.buffered <= 128
    usage = reader.finish()
    for value in (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens):
        assert value is None or (type(value) is int and value >= 0)


def test_only_usage_objects_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks with ``"usage": null`` or no usage key are never JSON-decoded."""
    from llmproxy.proxy import _usage

    decoded: list[bytes] = []
    real = _usage._loads

    def counting(data: bytes) -> object:
        decoded.append(data)
        return real(data)

    monkeypatch.setattr(_usage, "_loads", counting)
    assert _read(OPENAI_STREAM, SSE, cuts=range(0, len(OPENAI_STREAM), 50)) == Usage(
        17, 27, 44
    )
    assert len(decoded) == 1
    decoded.clear()
    assert _read(ANTHROPIC_STREAM, SSE) == Usage(30, 15, 45)
    assert len(decoded) == 2
